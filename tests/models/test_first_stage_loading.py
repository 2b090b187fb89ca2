"""Later stages hold the plain first stage; checkpoints that held a whole autoencoder still load.

Before the first stage was a plain module, the conditioner and the LDM held the whole
``AutoencoderModule``: their checkpoints had every key of the autoencoder's checkpoint under
``first_stage.`` (its discriminator ``first_stage.loss.*`` and ``first_stage.train_batches``
too, in ``state_dict`` and in the EMA's ``current_model_state``), and their first-stage record
held all of its hyperparameters. :func:`previous_layout` rewrites a checkpoint of today into
that layout; that it is the same is checked against an LDM checkpoint written by commit
86d7b2a (the same keys, 17 of them beyond the network: 16 discriminator, one step counter).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ldm_lightning.models import AutoencoderModule, ConditionerModule, LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.models.conditioning import TextConditioning
from ldm_lightning.models.first_stage import build_first_stage
from ldm_lightning.nn.first_stage import FirstStage, is_first_stage_key
from ldm_lightning.train import train
from tests.hydra_utils import TINY_AUTOENCODER, compose_config
from tests.test_conditioning_train import TINY_CLIP, TINY_DATA, TINY_LDM


def ldm_overrides(ae: Path) -> list[str]:
    return ["+experiment=shapes_ldm", *TINY_DATA, *TINY_LDM, f"model.first_stage.ckpt_path={ae}"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints: VQ autoencoder, text conditioner and LDM (with EMA) on it."""
    root = tmp_path_factory.mktemp("stages")
    train(compose_config(["+experiment=shapes_vq", *TINY_AUTOENCODER, "test=false"], root / "ae"))
    ae = root / "ae" / "checkpoints" / "last.ckpt"
    train(compose_config(["+experiment=shapes_clip", *TINY_DATA, *TINY_CLIP, "test=false",
                          f"model.first_stage.ckpt_path={ae}"], root / "clip"))
    train(compose_config(ldm_overrides(ae), root / "ldm"))
    return {name: root / name / "checkpoints" / "last.ckpt" for name in ("ae", "clip", "ldm")}


def previous_layout(stage: Path, ae: Path, out: Path) -> Path:
    """``stage``'s checkpoint as the code before the plain first stage wrote it (see above)."""
    checkpoint = torch.load(stage, weights_only=True)
    autoencoder = torch.load(ae, weights_only=True)
    training_keys = {f"first_stage.{k}": v for k, v in autoencoder["state_dict"].items()
                     if not is_first_stage_key(k)}
    assert len(training_keys) == 17 and "first_stage.train_batches" in training_keys
    for entry in ("state_dict", "current_model_state"):
        if entry in checkpoint:
            checkpoint[entry] = {**training_keys, **checkpoint[entry]}
    checkpoint["hyper_parameters"]["first_stage"]["hparams"] = autoencoder["hyper_parameters"]
    torch.save(checkpoint, out)
    return out


@pytest.mark.parametrize("stage", ["clip", "ldm"])
def test_a_later_stage_checkpoint_holds_only_the_first_stage_network(stages, stage) -> None:
    checkpoint = torch.load(stages[stage], weights_only=True)
    autoencoder = torch.load(stages["ae"], weights_only=True)
    network = {f"first_stage.{k}" for k in autoencoder["state_dict"] if is_first_stage_key(k)}
    entries = ["state_dict", "current_model_state"] if stage == "ldm" else ["state_dict"]
    for entry in entries:
        keys = set(checkpoint[entry])
        assert {k for k in keys if k.startswith("first_stage.")} == network
        assert not [k for k in keys if any(word in k for word in
                                           ("loss.", "discriminator", "lpips", "train_batches"))]
    record = checkpoint["hyper_parameters"]["first_stage"]["hparams"]
    assert record == FirstStage.from_config(autoencoder["hyper_parameters"]).config
    assert "loss" not in record and "optimizer" not in record


def test_the_first_stage_is_the_autoencoders_network_frozen(stages) -> None:
    ae = load_stage(AutoencoderModule, stages["ae"], "autoencoder")
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    first_stage, _ = build_first_stage(ckpt_path=str(stages["ae"]))
    assert torch.equal(torch.rand(3), expected_draw), "building it drew random numbers"
    assert type(first_stage) is FirstStage and not first_stage.training
    assert not any(p.requires_grad for p in first_stage.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        torch.testing.assert_close(first_stage.encode(x), z, rtol=0, atol=0)
        torch.testing.assert_close(first_stage.decode(z), ae.decode(z), rtol=0, atol=0)
    ldm = load_stage(LatentDiffusionModule, stages["ldm"], "latent_diffusion")
    assert type(ldm.first_stage) is FirstStage
    assert not isinstance(ldm.first_stage, pl.LightningModule)
    assert ldm.train().unet.training and not ldm.first_stage.training


def test_checkpoints_of_the_previous_layout_load(stages, tmp_path) -> None:
    old_ldm = previous_layout(stages["ldm"], stages["ae"], tmp_path / "ldm.ckpt")
    models = [load_stage(LatentDiffusionModule, p, "latent_diffusion")
              for p in (stages["ldm"], old_ldm)]
    assert models[1].hparams.first_stage["hparams"] == models[0].hparams.first_stage["hparams"]
    torch.testing.assert_close(models[1].sample(n=2, steps=2, seed=3),
                               models[0].sample(n=2, steps=2, seed=3), rtol=0, atol=0)

    old_clip = previous_layout(stages["clip"], stages["ae"], tmp_path / "clip.ckpt")
    clips = [load_stage(ConditionerModule, p, "conditioner") for p in (stages["clip"], old_clip)]
    new_state = clips[0].state_dict()
    for name, value in clips[1].state_dict().items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, new_state[name], rtol=0, atol=0)
    assert TextConditioning(text_ckpt_path=str(old_clip)).text.tokenizer is not None


def test_training_resumes_from_a_checkpoint_of_the_previous_layout(stages, tmp_path) -> None:
    old = previous_layout(stages["ldm"], stages["ae"], tmp_path / "old.ckpt")
    before = torch.load(old, weights_only=True)
    train(compose_config([*ldm_overrides(stages["ae"]), f"ckpt_path={old}",
                          "trainer.max_epochs=2"], tmp_path / "run"))
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] > before["global_step"]
    assert resumed["scale_factor"] == before["scale_factor"]
    assert not [k for k in resumed["current_model_state"] if "loss." in k]
