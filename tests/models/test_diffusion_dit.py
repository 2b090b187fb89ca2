"""LatentDiffusionModule with the DiT backbone: every conditioning kind, the latent-size check,
training through the configs (``model/backbone=dit_s``), samplers, a checkpoint round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import export_stage, load_stage
from ldm_lightning.nn.dit import DiT
from ldm_lightning.train import train
from tests.checkpoint_utils import perturbed_copy, write_checkpoint
from tests.hydra_utils import compose_config
from tests.models.test_conditioning import CAPTIONS, TEXT, conditioning_config
from tests.models.test_diffusion_module import TINY_LDM
from tests.nn.test_unet import _randomise

TINY_DIT = {"_target_": "ldm_lightning.nn.dit.DiT", "hidden_size": 16, "depth": 2,
            "num_heads": 2}
CONDITIONINGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "class_time": conditioning_config("class", num_classes=4, class_route="time"),
    "class_tokens": conditioning_config("class", num_classes=4, class_route="context", width=8),
    "class_both": conditioning_config("class", num_classes=4, class_route="both", width=8),
    "text": conditioning_config("text", width=8, text=TEXT, text_ckpt_path=None),
}


def dit_ldm(conditioning: dict[str, Any] | None = None, **unet: Any) -> LatentDiffusionModule:
    """A pixel-space LDM on 8 px images with a tiny DiT, its zero-initialised layers random."""
    torch.manual_seed(0)
    ldm = LatentDiffusionModule(
        unet={**TINY_DIT, **unet},
        first_stage={"identity": True},
        image_size=8,
        schedule={"kind": "linear", "timesteps": 100},
        scale_factor=1.0,
        conditioning=conditioning,
        sampling={"steps": 3},
    )
    if conditioning is not None and conditioning["_target_"].endswith("TextConditioning"):
        ldm.conditioner.text.fit_tokenizer(CAPTIONS)
    _randomise(ldm.unet)
    return ldm.eval()


@pytest.mark.parametrize("kind", list(CONDITIONINGS))
def test_every_conditioning_kind_reaches_the_dit(kind: str) -> None:
    ldm = dit_ldm(CONDITIONINGS[kind])
    dit = ldm.unet
    assert type(dit) is DiT and dit.input_size == 8  # input_size null: the latent size
    assert dit.num_classes == (5 if kind in ("class_time", "class_both") else None)
    assert dit.context_dim == (None if kind in ("none", "class_time") else 8)
    batch = {"image": torch.rand(4, 3, 8, 8) * 2 - 1, "label": torch.tensor([0, 1, 2, 3]),
             "caption": CAPTIONS[:4]}
    ldm.train()
    loss = ldm.diffusion_loss(ldm.latents(batch), ldm.conditioning(batch, train=True))
    loss.backward()
    assert loss.isfinite() and dit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    ldm.eval()
    if kind == "none":
        assert ldm.sample(n=2, seed=0).shape == (2, 3, 8, 8)
        return
    given = {"prompts": CAPTIONS[:2]} if kind == "text" else {"labels": [0, 3]}
    other = {"prompts": CAPTIONS[2:4]} if kind == "text" else {"labels": [1, 2]}
    samples = ldm.sample(n=2, seed=0, guidance_scale=3.0, **given)
    assert samples.shape == (2, 3, 8, 8)
    assert not torch.allclose(samples, ldm.sample(n=2, seed=0, guidance_scale=3.0, **other))
    assert not torch.allclose(samples, ldm.sample(n=2, seed=0, **given))  # guidance moves them


def test_a_latent_size_the_patch_size_does_not_divide_fails_at_start() -> None:
    with pytest.raises(ValueError, match=r"latents are 10x10 \(image_size 10 / f 1\), not "
                                         r"divisible by the DiT's patch_size 4"):
        LatentDiffusionModule(unet={**TINY_DIT, "patch_size": 4}, first_stage={"identity": True},
                              image_size=10, scale_factor=1.0)


# +experiment=shapes_ldm with TINY_LDM's data and trainer, a DiT of its own sizes instead of the
# UNet's, in pixel space: 2 training steps, one validation batch.
TRAIN_DIT = [
    "+experiment=shapes_ldm", *(o for o in TINY_LDM if not o.startswith("model.unet.")),
    "model/backbone=dit_s", "model.unet.patch_size=4", "model.unet.hidden_size=16",
    "model.unet.depth=2", "model.unet.num_heads=2",
    "model.first_stage.identity=true", "model.scale_factor_batches=2", "data.cache_latents=false",
    "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "test=false",
    "model.sampling.steps=2", "model.num_log_images=2",
]


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("dit")
    train(compose_config(TRAIN_DIT, run))
    return run


def test_model_backbone_dit_trains_through_the_configs(dit_run: Path) -> None:
    checkpoint = torch.load(dit_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    unet = checkpoint["hyper_parameters"]["unet"]
    assert unet["_target_"] == "ldm_lightning.nn.dit.DiT" and unet["patch_size"] == 4
    assert unet["input_size"] is None and "model_channels" not in unet
    # The module attribute and the checkpoint keys stay `unet`, whatever the backbone.
    assert "unet.blocks.1.adaLN_modulation.1.weight" in checkpoint["state_dict"]
    assert "unet.pos_embed" not in checkpoint["state_dict"]  # sin-cos: rebuilt from the sizes
    model = load_stage(LatentDiffusionModule, dit_run / "checkpoints" / "last.ckpt",
                       "latent_diffusion")
    state = model.state_dict()
    assert all(torch.equal(state[name], value) for name, value in checkpoint["state_dict"].items())
    assert list((dit_run / "images").glob("samples_epoch000_*.png"))


@pytest.fixture(scope="module")
def woken_ckpt(dit_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained DiT LDM with noise on its weights: two steps leave its zero-initialised
    final layer near 0, and samples would hardly depend on the weights."""
    return perturbed_copy(dit_run / "checkpoints" / "last.ckpt",
                          tmp_path_factory.mktemp("woken") / "woken.ckpt")


@pytest.fixture(scope="module")
def woken_dit(woken_ckpt: Path) -> LatentDiffusionModule:
    return load_stage(LatentDiffusionModule, woken_ckpt, "latent_diffusion")


SAMPLERS = ["ddim", "ddpm", "dpmpp_2m", "euler", "heun"]


def test_a_dit_checkpoint_round_trip_samples_alike_with_every_sampler(
    woken_dit: LatentDiffusionModule, tmp_path: Path
) -> None:
    assert type(woken_dit.unet) is DiT and woken_dit.unet.input_size == 16
    again = load_stage(LatentDiffusionModule, write_checkpoint(woken_dit, tmp_path / "a.ckpt"),
                       "latent_diffusion")
    state = again.state_dict()
    assert state.keys() == woken_dit.state_dict().keys()
    assert all(torch.equal(value, state[name]) for name, value in woken_dit.state_dict().items())
    samples = {}
    for sampler in SAMPLERS:
        samples[sampler] = woken_dit.sample(n=2, steps=2, sampler=sampler, seed=0)
        assert samples[sampler].shape == (2, 3, 16, 16) and samples[sampler].isfinite().all()
        assert torch.equal(again.sample(n=2, steps=2, sampler=sampler, seed=0), samples[sampler])
    assert not torch.allclose(samples["ddpm"], samples["ddim"])


def test_a_dit_export_samples_as_its_checkpoint(
    woken_ckpt: Path, woken_dit: LatentDiffusionModule, tmp_path: Path
) -> None:
    exported = LatentDiffusionModule.load_from_checkpoint(export_stage(woken_ckpt, tmp_path / "x"))
    assert type(exported.unet) is DiT
    samples = woken_dit.sample(n=2, steps=2, seed=0)
    assert torch.equal(exported.sample(n=2, steps=2, seed=0), samples)
