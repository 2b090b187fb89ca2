"""Spatial conditions concatenated to z_t: channels, closed forms, dropout, guidance, errors,
checkpoints."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage, read_checkpoint
from ldm_lightning.models.spatial import (
    InpaintCondition,
    SemanticCondition,
    UpscaleCondition,
    build_spatial,
)
from tests.checkpoint_utils import write_checkpoint
from tests.models.test_diffusion_module import TINY_UNET
from tests.nn.test_unet import _randomise

SPATIAL = "ldm_lightning.models.spatial."


def spatial_ldm(kind: str, unet: dict | None = None, **options) -> LatentDiffusionModule:
    """A tiny pixel-space (identity, 3 channels) flow model at 16 px with random weights."""
    torch.manual_seed(0)
    model = LatentDiffusionModule(
        unet=unet or TINY_UNET, first_stage={"identity": True}, image_size=16, scale_factor=1.0,
        process={"_target_": "ldm_lightning.diffusion.processes.FlowProcess"},
        spatial={"_target_": SPATIAL + kind, **options}, sampling={"sampler": "euler", "steps": 3},
    )
    return _randomise(model).eval()


def shapes_batch(n: int = 4) -> dict[str, torch.Tensor]:
    from ldm_lightning.data.shapes import ShapesDataset

    items = [ShapesDataset(n, 16, split="val")[i] for i in range(n)]
    return {k: torch.stack([torch.as_tensor(item[k]) for item in items])
            for k in ("image", "segmentation")}


@pytest.mark.parametrize(("kind", "options", "extra"), [
    ("InpaintCondition", {}, 3 + 1),  # the masked image's latent + the mask
    ("UpscaleCondition", {}, 3),
    ("SemanticCondition", {}, 2),
    ("SemanticCondition", {"num_classes": 5}, 5),
])
def test_each_kind_grows_the_backbones_input_by_its_channels(kind, options, extra) -> None:
    model = spatial_ldm(kind, **options)
    assert model.unet.in_channels == 3 + extra and model.unet.out_channels == 3
    dit = {"_target_": "ldm_lightning.nn.dit.DiT", "hidden_size": 16, "depth": 1,
           "num_heads": 2, "patch_size": 4}
    assert spatial_ldm(kind, unet=dit, **options).unet.x_embedder.proj.in_channels == 3 + extra


def test_the_conditions_at_latent_resolution_are_their_closed_forms() -> None:
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4, :2] = 1  # latent 4x4: cell (0, 0) covered fully, (1, 0) fully, others 0
    double = InpaintCondition().encode({"image": image, "mask": mask}, lambda x: 2 * x, 8)
    assert torch.equal(double[:, :3], 2 * image * (1 - mask)) and torch.equal(double[:, 3:], mask)
    area = InpaintCondition().encode({"image": image, "mask": mask},
                                     lambda x: F.avg_pool2d(x, 2), 4)[:, 3]
    assert area[0, :2, 0].tolist() == [1.0, 1.0] and area[0, 2:].sum() == 0
    low = torch.rand(2, 3, 2, 2)
    upscale = UpscaleCondition(factor=4)
    assert torch.equal(upscale.encode({"image": low}, None, 2), low)  # at latent res: itself
    segmentation = torch.zeros(1, 8, 8, dtype=torch.long)
    segmentation[0, :, :3] = 1
    segmentation[0, 0, 7] = -1  # no class
    shares = SemanticCondition().encode({"segmentation": segmentation}, None, 4)
    assert shares[0, 1, :, 0].tolist() == [1.0] * 4  # columns 0-1: class 1
    assert shares[0, 1, :, 1].tolist() == [0.5] * 4  # columns 2-3: half class 1
    assert shares[0, 0, 0, 3].item() == 0.75 and shares.sum().item() == 16 - 0.25


def test_upscale_downsamples_the_batch_by_its_factor_and_lifts_it_to_the_latents() -> None:
    image = shapes_batch(2)["image"]
    condition = UpscaleCondition(factor=4)(
        {"image": image}, None, latent_size=8, train=False
    )
    low = F.interpolate(image, size=4, mode="bicubic", antialias=True).clamp(-1, 1)
    assert torch.allclose(condition, F.interpolate(low, size=8, mode="bicubic").clamp(-1, 1))


def test_training_drops_conditions_to_the_null_at_rate_p_uncond() -> None:
    torch.manual_seed(0)
    n, p = 4000, 0.3
    segmentation = torch.ones(n, 4, 4, dtype=torch.long)
    semantic = SemanticCondition(p_uncond=p)
    condition = semantic({"segmentation": segmentation}, None, 2, train=True)
    dropped = condition.flatten(1).sum(1) == 0  # the null: no class anywhere
    kept = condition[~dropped]
    assert torch.equal(kept[:, 1], torch.ones_like(kept[:, 1])) and kept[:, 0].sum() == 0
    assert abs(dropped.float().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5
    evaluation = semantic({"segmentation": segmentation}, None, 2, train=False)
    assert evaluation.flatten(1).sum(1).min() > 0  # nothing dropped outside training
    null = InpaintCondition().null_inputs({"image": torch.rand(2, 3, 4, 4),
                                           "mask": torch.zeros(2, 1, 4, 4)})
    assert null["mask"].min() == 1 and null["image"].abs().max() == 0  # all to fill


def test_guidance_scale_0_samples_the_null_condition() -> None:
    model = spatial_ldm("SemanticCondition")
    segmentation = shapes_batch(2)["segmentation"]
    null = torch.full_like(segmentation, -1)
    unconditional = model.sample(n=2, spatial={"segmentation": null})
    assert torch.allclose(model.sample(n=2, guidance_scale=0.0,
                                       spatial={"segmentation": segmentation}), unconditional,
                          atol=1e-5)
    assert not torch.allclose(model.sample(n=2, spatial={"segmentation": segmentation}),
                              unconditional, atol=1e-3)


def test_one_item_is_repeated_for_every_sample() -> None:
    model = spatial_ldm("UpscaleCondition")
    low = torch.rand(1, 3, 4, 4) * 2 - 1
    assert torch.equal(model.sample(n=2, spatial={"image": low}),
                       model.sample(n=2, spatial={"image": low.expand(2, -1, -1, -1)}))


def test_bad_inputs_are_clear_errors_before_sampling() -> None:
    inpaint = spatial_ldm("InpaintCondition")
    with pytest.raises(ValueError, match="the mask is 8x8 but the image is 16x16"):
        inpaint.sample(n=1, spatial={"image": torch.zeros(1, 3, 16, 16),
                                     "mask": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(ValueError, match=r"pass spatial=\{'image', 'mask': ...\}, or "
                                         "task=inpaint image=<png> mask=<png>"):
        inpaint.sample(n=1)
    with pytest.raises(ValueError, match="upscaled x4 to the model's 16x16: give a 4x4 image"):
        spatial_ldm("UpscaleCondition").sample(n=1, spatial={"image": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(ValueError, match=r"classes 3..3, but this model knows 0..1"):
        spatial_ldm("SemanticCondition").sample(
            n=1, spatial={"segmentation": torch.full((1, 16, 16), 3)})
    plain = LatentDiffusionModule(unet=TINY_UNET, first_stage={"identity": True}, image_size=16,
                                  scale_factor=1.0)
    with pytest.raises(ValueError, match="this model has no spatial condition"):
        plain.sample(n=1, spatial={"image": torch.zeros(1, 3, 4, 4)})


def test_a_latent_cache_or_a_batch_of_latents_is_refused_naming_the_fix() -> None:
    model = spatial_ldm("InpaintCondition")
    with pytest.raises(ValueError, match="set data.cache_latents=false"):
        model.use_data(SimpleNamespace(cache_latents=True, batch_size=4))
    with pytest.raises(ValueError, match="lacks .*use data.cache_latents=false"):
        model.conditioning({"latent": torch.zeros(2, 3, 16, 16)}, train=True)


def test_the_config_is_checked_and_recorded() -> None:
    module, record = build_spatial({"_target_": SPATIAL + "UpscaleCondition", "factor": 2})
    assert module.factor == 2
    assert record == {"_target_": f"{SPATIAL}upscale.UpscaleCondition", "kind": "upscale",
                      "factor": 2}
    with pytest.raises(ValueError, match="does not choose the kind: use model/spatial=inpaint"):
        build_spatial({"_target_": SPATIAL + "UpscaleCondition", "kind": "inpaint"})
    with pytest.raises(ValueError, match="num_classes, not options of model/spatial=upscale"):
        build_spatial({"_target_": SPATIAL + "UpscaleCondition", "num_classes": 3})
    with pytest.raises(ValueError, match="is not a spatial condition class"):
        build_spatial({"_target_": "os.system"})


def test_a_checkpoint_rebuilds_its_condition_and_old_ones_have_none(tmp_path: Path) -> None:
    model = spatial_ldm("SemanticCondition", num_classes=3)
    loaded = load_stage(LatentDiffusionModule, write_checkpoint(model, tmp_path / "s.ckpt"),
                        "latent_diffusion")
    assert loaded.spatial.num_classes == 3 and loaded.unet.in_channels == 6
    segmentation = shapes_batch(1)["segmentation"] * 2
    assert torch.equal(loaded.sample(n=1, spatial={"segmentation": segmentation}),
                       model.sample(n=1, spatial={"segmentation": segmentation}))
    plain = LatentDiffusionModule(unet=TINY_UNET, first_stage={"identity": True}, image_size=16,
                                  scale_factor=1.0)
    path = write_checkpoint(plain, tmp_path / "old.ckpt")
    checkpoint = read_checkpoint(path)
    del checkpoint["hyper_parameters"]["spatial"]  # written before spatial conditions
    torch.save(checkpoint, path)
    old = load_stage(LatentDiffusionModule, path, "latent_diffusion")
    assert old.spatial is None and old.unet.in_channels == 3
