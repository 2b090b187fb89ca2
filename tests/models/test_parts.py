"""Parts chosen by ``_target_``: optimiser, LDM backbone, conditioner encoder.

Each name is resolved by :func:`~ldm_lightning.utils.targets.resolve_class` (nothing imported
outside ``ldm_lightning`` or called before it is checked to subclass the part's base), and
checkpoints written before the ``_target_`` keys (``model.optimizer`` and ``model.unet`` without
one, ``encoder: "text" | "class"`` with ``text``, ``num_classes``, ``num_tokens``) still load.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hydra
import pytest
import torch
from torch import Tensor, nn

from ldm_lightning.models import AutoencoderModule, ConditionerModule, LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.models.conditioner import ENCODERS
from ldm_lightning.models.conditioning import TextConditioning
from ldm_lightning.models.optim import build_optimizer, scaled_learning_rate
from ldm_lightning.nn.condition_encoders import CaptionEncoder, ClassEncoder
from ldm_lightning.nn.unet import UNetModel
from ldm_lightning.utils.targets import resolve_class
from tests.checkpoint_utils import write_checkpoint
from tests.hydra_utils import compose_config
from tests.models.test_conditioning import CAPTIONS, TEXT, tiny_ldm
from tests.models.test_diffusion_module import tiny_pixel_ddpm

REFUSED = ["os.system", "collections.OrderedDict", "this.Zen", "torch.optim.Missing", "AdamW"]


class TinyBackbone(nn.Module):
    """A backbone other than the UNet: one conv; takes (and ignores) the UNet's settings."""

    def __init__(self, *, in_channels: int, out_channels: int, **unet_settings: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, **conditions: Tensor) -> Tensor:
        return self.conv(x)


class MeanCaptionEncoder(nn.Module):
    """A caption encoder other than ours: one learned context token per caption length."""

    def __init__(self, width: int, max_length: int = 64) -> None:
        super().__init__()
        self.width = width
        self.embedding = nn.Embedding(max_length, width)

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        lengths = torch.tensor([min(len(c), 63) for c in captions])
        context = self.embedding(lengths)[:, None]
        return context, context[:, 0]


def stand_in_trainer() -> SimpleNamespace:
    """What configure_optimizers reads from a trainer."""
    return SimpleNamespace(
        num_devices=1, num_nodes=1,
        accumulate_grad_batches=1, estimated_stepping_batches=100,
    )


def name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------- resolve_class
@pytest.mark.parametrize("target", REFUSED)
def test_resolve_class_refuses_what_is_not_an_imported_subclass(target) -> None:
    assert "this" not in sys.modules  # importing it prints the Zen of Python
    with pytest.raises(ValueError, match=rf"'{target}' is not a torch optimizer.*torch.optim"):
        resolve_class(target, torch.optim.Optimizer, "torch optimizer", "set it right")
    assert "this" not in sys.modules
    assert resolve_class("torch.optim.SGD", torch.optim.Optimizer, "x", "") is torch.optim.SGD


# ---------------------------------------------------------------------------- optimiser
def ldm_optimizer(settings: dict[str, Any] | None) -> tuple[Any, Any]:
    module = tiny_pixel_ddpm(optimizer=settings)
    module.trainer = stand_in_trainer()
    module.use_data(SimpleNamespace(batch_size=4))  # what connect(model, datamodule) hands over
    configured = module.configure_optimizers()
    return module, configured


def test_an_sgd_target_builds_sgd_with_the_scaled_rate_and_schedule() -> None:
    settings = {"_target_": "torch.optim.SGD", "_partial_": True, "base_lr": 1e-3,
                "scale_lr": True, "warmup_steps": 10, "schedule": "cosine", "momentum": 0.9}
    module, configured = ldm_optimizer(settings)
    optimizer = configured["optimizer"]
    scheduler = configured["lr_scheduler"]["scheduler"]
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.9
    assert group["initial_lr"] == pytest.approx(scaled_learning_rate(module, 1e-3, True))
    assert group["initial_lr"] != pytest.approx(1e-3)  # batch 4: scaled
    assert scheduler.lr_lambdas[0](0) == pytest.approx(0.1)  # warm-up
    assert scheduler.lr_lambdas[0](100) == pytest.approx(0.0)  # cosine to min_lr_ratio 0


@pytest.mark.parametrize("target", ["os.system", "collections.OrderedDict"])
def test_a_refused_optimizer_target_says_what_to_set(target) -> None:
    with pytest.raises(ValueError, match=rf"'{target}' is not a torch optimizer.*model.optimizer"):
        ldm_optimizer({"_target_": target, "base_lr": 1e-3})


def test_arguments_the_class_does_not_take_are_named() -> None:
    with pytest.raises(ValueError, match="SGD.*betas.*model.optimizer._target_"):
        ldm_optimizer({"_target_": "torch.optim.SGD", "base_lr": 1e-3, "betas": [0.9, 0.99]})


def test_settings_without_target_are_todays_optimizers() -> None:
    old = {"base_lr": 1e-3, "scale_lr": False, "betas": [0.8, 0.95], "weight_decay": 0.1}
    _, configured = ldm_optimizer(old)
    optimizer = configured["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert type(ldm_optimizer(None)[1]["optimizer"]) is torch.optim.AdamW

    ae = AutoencoderModule(ch=8, ch_mult=[1], num_res_blocks=1, image_size=32, z_channels=2,
                           embed_dim=2, n_embed=8, loss={"perceptual_weight": 0},
                           optimizer={"base_lr": 1e-4, "scale_lr": False, "betas": [0.5, 0.9]})
    ae.trainer = stand_in_trainer()
    ae.use_data(SimpleNamespace(batch_size=4))
    optimizers, schedulers = ae.configure_optimizers()
    assert [type(opt) for opt in optimizers] == [torch.optim.Adam, torch.optim.Adam]
    assert [opt.param_groups[0]["betas"] for opt in optimizers] == [(0.5, 0.9)] * 2
    assert len(schedulers) == 2


def test_another_class_takes_only_the_rate_keys_of_the_defaults() -> None:
    module = tiny_pixel_ddpm()
    defaults = {"_target_": "torch.optim.AdamW", "base_lr": 2e-3, "betas": (0.9, 0.999)}
    optimizer, _ = build_optimizer(module, module.parameters(), {"_target_": "torch.optim.SGD"},
                                   defaults)
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["lr"] == 2e-3


# ---------------------------------------------------------------------------- backbone
def test_a_backbone_target_builds_that_module_with_the_latent_channels() -> None:
    module = tiny_pixel_ddpm(unet={"_target_": name(TinyBackbone), "model_channels": 4})
    assert type(module.unet) is TinyBackbone and module.unet.conv.in_channels == 3
    assert module.sample(n=1, steps=2, seed=0).shape == (1, 3, 16, 16)
    # No channel_mult: no levels to check, any latent size.
    assert type(tiny_pixel_ddpm(unet={"_target_": name(TinyBackbone)}, image_size=15).unet)


def test_the_unet_levels_are_still_checked_without_channel_mult() -> None:
    unet = {"model_channels": 8, "num_res_blocks": 1, "attention_resolutions": [],
            "num_head_channels": 8}  # UNetModel's default channel_mult: 3 downsamplings
    with pytest.raises(ValueError, match="not divisible by the UNet's downsampling 8"):
        tiny_pixel_ddpm(unet=unet, image_size=12)


@pytest.mark.parametrize("target", ["os.system", "collections.OrderedDict"])
def test_a_refused_backbone_target_says_what_to_set(target) -> None:
    with pytest.raises(ValueError, match=rf"'{target}' is not a backbone.*model.unet._target_"):
        tiny_pixel_ddpm(unet={"_target_": target})


def test_an_ldm_checkpoint_without_targets_loads(tmp_path: Path) -> None:
    """Today's tiny LDM written as the code before ``_target_`` in unet and optimizer did."""
    torch.manual_seed(0)
    ldm = tiny_ldm({"_target_": "ldm_lightning.models.conditioning.NoConditioning"})
    new = write_checkpoint(ldm, tmp_path / "new.ckpt")
    checkpoint = torch.load(new, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert "_target_" not in hparams["unet"]  # tiny_ldm writes it as before
    hparams["optimizer"] = {"base_lr": 2e-6, "scale_lr": True, "betas": [0.9, 0.999]}
    torch.save(checkpoint, tmp_path / "old.ckpt")
    old = load_stage(LatentDiffusionModule, tmp_path / "old.ckpt", "latent_diffusion")
    assert type(old.unet) is UNetModel and old.state_dict().keys() == ldm.state_dict().keys()
    torch.testing.assert_close(old.sample(n=1, steps=2, seed=0), ldm.sample(n=1, steps=2, seed=0))
    assert type(old.configure_optimizers()["optimizer"]) is torch.optim.AdamW


# ---------------------------------------------------------------------------- encoder
@pytest.mark.parametrize(("config", "cls"), [("conditioner_text", CaptionEncoder),
                                             ("conditioner_class", ClassEncoder)])
def test_the_config_files_choose_the_encoder_class(config, cls, tmp_path) -> None:
    overrides = [f"model={config}", "model.first_stage.identity=true", "model.width=8",
                 "model.image_encoder.channels=[8]", "model.embed_dim=4"]
    if cls is ClassEncoder:
        overrides.append("model.encoder.num_classes=5")
    module = hydra.utils.instantiate(compose_config(overrides, tmp_path).model)
    assert type(module.encoder) is cls and module.encoder.width == 8
    assert module.hparams.encoder["_target_"] == name(cls)


def test_another_encoder_class_is_one_target_away() -> None:
    module = ConditionerModule(encoder={"_target_": name(MeanCaptionEncoder)}, width=8,
                               first_stage={"identity": True}, embed_dim=4,
                               image_encoder={"channels": [8]})
    assert type(module.encoder) is MeanCaptionEncoder
    batch = {"image": torch.zeros(2, 3, 8, 8), "caption": ["a", "bb"]}
    assert module.embed(batch)[1].shape == (2, 4)
    with pytest.raises(ValueError, match="'os.system' is not a condition encoder"):
        ConditionerModule(encoder={"_target_": "os.system"}, first_stage={"identity": True})
    with pytest.raises(ValueError, match="ClassEncoder.*vocab_size.*model.encoder"):
        ConditionerModule(encoder={"_target_": ENCODERS["class"], "num_classes": 3,
                                   "vocab_size": 9}, first_stage={"identity": True})
    with pytest.raises(ValueError, match="num_classes: the settings of a model.encoder string"):
        ConditionerModule(encoder={"_target_": ENCODERS["class"]}, num_classes=3,
                          first_stage={"identity": True})


def previous_conditioner_layout(new: Path, out: Path, text: dict[str, Any]) -> Path:
    """``new``'s conditioner checkpoint as the code before encoder classes wrote it: the string
    ``encoder``, ``text`` (a class run's too, from conditioner_text.yaml), ``num_classes``,
    ``num_tokens``; the weights as they are."""
    checkpoint = torch.load(new, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    encoder = dict(hparams["encoder"])
    kind = {ENCODERS["text"]: "text", ENCODERS["class"]: "class"}[encoder.pop("_target_")]
    hparams.update(encoder="text", text=encoder, num_classes=None, num_tokens=1)
    if kind == "class":
        hparams.update(encoder="class", text=text, **encoder)
    torch.save(checkpoint, out)
    return out


def test_conditioner_checkpoints_of_the_string_encoder_load(tmp_path: Path) -> None:
    common = {"width": 16, "first_stage": {"identity": True}, "embed_dim": 8,
              "image_encoder": {"channels": [8]}}
    text = ConditionerModule(encoder={"_target_": ENCODERS["text"], **TEXT}, **common)
    text.encoder.fit_tokenizer(CAPTIONS)
    classes = ConditionerModule(
        encoder={"_target_": ENCODERS["class"], "num_classes": 5, "num_tokens": 2}, **common
    )
    captions = ["a red circle on a gray background", ""]
    for module, condition in ((text, captions), (classes, torch.tensor([0, 4]))):
        new = write_checkpoint(module, tmp_path / "new.ckpt")
        old = previous_conditioner_layout(new, tmp_path / "old.ckpt", TEXT)
        assert isinstance(torch.load(old, weights_only=True)["hyper_parameters"]["encoder"], str)
        loaded = load_stage(ConditionerModule, old, "conditioner")
        assert loaded.hparams.encoder == module.hparams.encoder  # saved as today's
        assert "text" not in loaded.hparams and "num_classes" not in loaded.hparams
        expected = module.eval().encoder(condition)[1]
        torch.testing.assert_close(loaded.encoder(condition)[1], expected)
    # The LDM's text conditioning reads the old text conditioner too.
    old = previous_conditioner_layout(write_checkpoint(text, tmp_path / "text.ckpt"),
                                      tmp_path / "old_text.ckpt", TEXT)
    conditioning = TextConditioning(text_ckpt_path=str(old))
    assert conditioning.record()["text_hparams"] == dict(text.encoder.config)
    torch.testing.assert_close(conditioning.encode(captions)["context"],
                               text.encoder(captions)[0])
