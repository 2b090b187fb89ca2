"""The ``callbacks=ema`` config: Lightning's EMAWeightAveraging with torch's multi-tensor EMA
(:class:`~ldm_lightning.callbacks.ema.ForeachEMA`)."""

from __future__ import annotations

from unittest.mock import patch

import hydra
import pytorch_lightning as pl
import torch
from torch import nn

from tests.hydra_utils import compose_config


class TwoWeights(pl.LightningModule):
    """Each SGD step (lr 1 on (w - x)^2 / 2) sets both weights to the step's batch value."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.b = nn.Parameter(torch.zeros(2))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x = batch[0][0, 0]
        return 0.5 * ((self.w - x) ** 2).sum() + 0.5 * ((self.b - x) ** 2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_the_ema_callback_averages_all_weights_in_one_foreach_update(tmp_path) -> None:
    cfg = compose_config(["callbacks=ema", "callbacks.ema.decay=0.5"], tmp_path)
    ema = hydra.utils.instantiate(cfg.callbacks.ema)
    assert ema.state_key == "EMAWeightAveraging"  # checkpoints of either callback resume
    targets = torch.tensor([[1.0], [3.0], [7.0]])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(targets), batch_size=1)
    model = TwoWeights()
    trainer = pl.Trainer(max_epochs=1, callbacks=[ema], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with patch.object(torch, "_foreach_lerp_", wraps=torch._foreach_lerp_) as lerp:
        trainer.fit(model, loader)
    # The first update copies; each later one is a single lerp over both weight tensors.
    assert lerp.call_count == 2 and all(len(call.args[0]) == 2 for call in lerp.call_args_list)
    # Weights after each step: 1, 3, 7; EMA: 1 (copied), 0.5*1 + 0.5*3 = 2, 0.5*2 + 0.5*7 = 4.5.
    # Lightning copies the average into the module at the end of fit.
    torch.testing.assert_close(model.w.detach(), torch.full((3,), 4.5))
    torch.testing.assert_close(model.b.detach(), torch.full((2,), 4.5))
