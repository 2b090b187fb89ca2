"""`python -m ldm_lightning.sample task=inpaint | upscale | semantic`: end to end from a tiny
training run and from tiny checkpoints; the kept region; clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.sample import run
from ldm_lightning.train import train
from tests.checkpoint_utils import write_checkpoint
from tests.hydra_utils import compose_config
from tests.models.test_diffusion_module import TINY_LDM
from tests.models.test_spatial import shapes_batch, spatial_ldm


def write_png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def write_palette_png(indices: np.ndarray, path: Path) -> Path:
    """Class indices as a palette PNG (class 1 red: its gray level, 76, is no class index)."""
    image = Image.fromarray(indices.astype(np.uint8), "P")
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.save(path)
    return path


def read_png(path: Path) -> torch.Tensor:
    return torchvision.io.read_image(str(path)).float() / 127.5 - 1


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task_files")
    image = ((shapes_batch(1)["image"][0].permute(1, 2, 0) + 1) * 127.5).round().numpy()
    mask = np.zeros((16, 16))
    mask[4:12, 2:9] = 255
    segmentation = shapes_batch(2)["segmentation"][1].numpy() * 255
    models = {kind: spatial_ldm(f"{kind.capitalize()}Condition")
              for kind in ("inpaint", "upscale", "semantic")}
    return {
        "image": write_png(image, root / "image.png"),
        "low": write_png(image[::4, ::4], root / "low.png"),
        "mask": write_png(mask, root / "mask.png"),
        "small_mask": write_png(mask[::2, ::2], root / "small_mask.png"),
        "map": write_png(segmentation, root / "map.png"),  # drawn by hand: black 0, white 1
        "index_map": write_png(segmentation / 255, root / "index_map.png"),  # a folder's: 0, 1
        "palette_map": write_palette_png(segmentation / 255, root / "palette_map.png"),
        **{kind: write_checkpoint(model, root / f"{kind}.ckpt") for kind, model in models.items()},
    }


def sample(tmp_path: Path, *overrides: str) -> Path:
    cfg = compose_config(["num_samples=2", "batch_size=2", "device=cpu", *overrides], tmp_path,
                         config_name="sample")
    return run(cfg)


def test_inpainting_keeps_the_unmasked_region_and_fills_the_masked_one(files, tmp_path) -> None:
    sample(tmp_path, f"ckpt_path={files['inpaint']}", "task=inpaint",
           f"image={files['image']}", f"mask={files['mask']}")
    known, mask = read_png(files["image"]), read_png(files["mask"])[:1] > 0
    model = load_stage(LatentDiffusionModule, files["inpaint"], "latent_diffusion")
    expected = model.sample(n=2, seed=0, spatial={"image": known, "mask": mask.float()})
    for index in range(2):
        written = read_png(tmp_path / "samples" / f"{index:05d}.png")
        assert torch.equal(written[:, ~mask[0]], known[:, ~mask[0]])  # pasted back, exactly
        filled = (written - expected[index])[:, mask[0]]
        assert filled.abs().max() < 1.5 / 127.5  # the model's own fill, to 8-bit rounding
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize(("task", "image", "key"), [
    ("upscale", "low", "image"), ("semantic", "map", "segmentation"),
    ("semantic", "index_map", "segmentation"), ("semantic", "palette_map", "segmentation"),
])
def test_upscale_and_semantic_sample_their_condition(files, tmp_path, task, image, key) -> None:
    sample(tmp_path, f"ckpt_path={files[task]}", f"task={task}", f"image={files[image]}")
    given = read_png(files[image])
    if task == "semantic":  # gray levels 0 / 255, gray or palette class indices 0 / 1 alike
        given = torch.from_numpy(np.asarray(Image.open(files[image])) > 0).long()[None]
        assert 0 < given.float().mean() < 1
    model = load_stage(LatentDiffusionModule, files[task], "latent_diffusion")
    expected = model.sample(n=2, seed=0, spatial={key: given})
    written = torch.stack([read_png(tmp_path / "samples" / f"{i:05d}.png") for i in range(2)])
    assert (written - expected).abs().max() < 1.5 / 127.5


@pytest.mark.parametrize(("overrides", "message"), [
    (["ckpt_path=<upscale>", "task=inpaint", "image=<image>", "mask=<mask>"],
     "task=inpaint needs a checkpoint trained with model/spatial=inpaint .*this one was "
     "trained with model/spatial=upscale"),
    (["ckpt_path=<inpaint>", "task=inpaint", "image=<image>", "mask=<small_mask>"],
     "the mask is 8x8 but the image is 16x16"),
    (["ckpt_path=<inpaint>", "task=inpaint", "image=<image>"],
     "task=inpaint takes task=inpaint image=<png> mask=<png>, with mask="),
    (["ckpt_path=<upscale>", "task=upscale", "image=<image>"],
     "the low-resolution image is 16x16 .*give a 4x4 image"),
    (["ckpt_path=<inpaint>", "image=<image>"], "image= and mask= are inputs of a task"),
    (["ckpt_path=<semantic>"], "this model is conditioned on a semantic input"),
])
def test_bad_task_inputs_are_clear_errors(files, tmp_path, overrides, message) -> None:
    filled = []
    for override in overrides:
        key, value = override.split("=")
        filled.append(f"{key}={files[value[1:-1]] if value.startswith('<') else value}")
    with pytest.raises(ValueError, match=message):
        sample(tmp_path, *filled)
    assert not (tmp_path / "samples").exists()


def test_shapes_inpaint_trains_and_samples_end_to_end(tmp_path: Path, files) -> None:
    run_dir = tmp_path / "train"
    tiny = [*TINY_LDM, "model.first_stage.identity=true", "model.sampling.steps=2", "test=false"]
    train(compose_config(["+experiment=shapes_inpaint", *tiny], run_dir))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert load_stage(LatentDiffusionModule, ckpt, "latent_diffusion").unet.in_channels == 7
    grid = sample(tmp_path / "sample", f"ckpt_path={ckpt}", "task=inpaint",
                  f"image={files['image']}", f"mask={files['mask']}")
    assert grid.is_file() and len(list((tmp_path / "sample" / "samples").glob("*.png"))) == 2
    with pytest.raises(ValueError, match="set data.cache_latents=false"):
        train(compose_config(["+experiment=shapes_inpaint", *tiny, "data.cache_latents=true"],
                             tmp_path / "cached"))
    assert not (tmp_path / "cached" / "cache").exists()  # refused before encoding
