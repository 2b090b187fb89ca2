"""`python -m ldm_lightning.sample`: files written, per-batch seeds, conditions, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torchvision

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.sample import run
from ldm_lightning.sampling import load_init_image
from tests.hydra_utils import compose_config
from tests.models.test_diffusion_module import autoencoder_ckpt, ldm_run  # noqa: F401 - fixtures
from tests.test_sampling import wide_png

REPO = Path(__file__).parents[1]


def test_run_writes_a_grid_and_one_png_per_sample_with_per_batch_seeds(
    ldm_run: Path,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    ckpt = ldm_run / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        [f"ckpt_path={ckpt}", "num_samples=3", "batch_size=2", "steps=3", "device=cpu"],
        tmp_path,
        config_name="sample",
    )
    grid = run(cfg)
    assert grid == tmp_path / "grid.png" and grid.stat().st_size > 0
    written = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in written] == ["00000.png", "00001.png", "00002.png"]
    # Batch i uses seed + i: the files equal direct calls with those seeds (to 8-bit rounding).
    model = load_stage(LatentDiffusionModule, ckpt, "latent_diffusion")
    expected = torch.cat([model.sample(n=2, steps=3, seed=0), model.sample(n=1, steps=3, seed=1)])
    for path, image in zip(written, expected):
        saved = torchvision.io.read_image(str(path)).float() / 255
        assert (saved - (image + 1) / 2).abs().max() < 1.5 / 255


def test_a_sampler_config_of_the_group_samples_as_its_dict(
    ldm_run: Path,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    ckpt = ldm_run / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        [f"ckpt_path={ckpt}", "num_samples=2", "steps=3", "device=cpu",
         "+model/sampler@sampler=ddpm", "sampler.variance=fixed_large"],
        tmp_path,
        config_name="sample",
    )
    run(cfg)
    model = load_stage(LatentDiffusionModule, ckpt, "latent_diffusion")
    sampler = {"_target_": "ldm_lightning.diffusion.samplers.DDPMSampler",
               "variance": "fixed_large"}
    expected = model.sample(n=2, steps=3, seed=0, sampler=sampler)
    assert not torch.allclose(expected, model.sample(n=2, steps=3, seed=0, sampler="ddpm"))
    saved = torchvision.io.read_image(str(tmp_path / "samples" / "00001.png")).float() / 255
    assert (saved - (expected[1] + 1) / 2).abs().max() < 1.5 / 255


def test_an_init_image_is_edited_on_a_larger_canvas(
    ldm_run: Path,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    """A 16 px model edits a 40x24 PNG at 24 px: the PNGs are model.sample's edits of its
    centre crop; strength 0 writes the autoencoder's reconstruction."""
    ckpt = ldm_run / "checkpoints" / "last.ckpt"
    png, _ = wide_png(tmp_path / "wide.png")
    model = load_stage(LatentDiffusionModule, ckpt, "latent_diffusion")
    image = load_init_image(png, 24)
    edits = {}
    for strength in (0.0, 0.5):
        out = tmp_path / f"strength{strength}"
        run(compose_config([f"ckpt_path={ckpt}", "num_samples=2", "steps=4", "device=cpu",
                            f"init_image={png}", f"strength={strength}", "image_size=24"],
                           out, config_name="sample"))
        edits[strength] = model.sample(n=2, steps=4, seed=0, image_size=24, init_images=image,
                                       strength=strength)
        for index, edit in enumerate(edits[strength]):
            saved = torchvision.io.read_image(str(out / "samples" / f"{index:05d}.png"))
            assert saved.shape == (3, 24, 24)
            assert (saved.float() / 255 - (edit + 1) / 2).abs().max() < 1.5 / 255
    reconstruction = model.decode(model.latents({"image": image}))
    torch.testing.assert_close(edits[0.0], reconstruction.expand(2, -1, -1, -1))
    assert not torch.allclose(edits[0.5], edits[0.0], atol=1e-3)


def test_labels_for_an_unconditional_checkpoint_are_a_clear_error(
    ldm_run: Path,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ldm_lightning.sample",
            f"ckpt_path={ldm_run / 'checkpoints' / 'last.ckpt'}",
            "labels=[1]",
            "num_samples=1",
            "steps=2",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "this model is unconditional" in result.stderr
    assert not (tmp_path / "grid.png").exists()
