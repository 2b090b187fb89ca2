"""LatentDiffusionModule.sample on another canvas (``image_size``) and from images (SDEdit's
``init_images``, ``strength``), with a real (untrained, f = 2) autoencoder and with guidance."""

from __future__ import annotations

import pytest
import torch

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.canvas import latent_size
from tests.checkpoint_utils import write_checkpoint
from tests.models.test_autoencoder_module import tiny as tiny_autoencoder
from tests.models.test_conditioning import conditioning_config, tiny_ldm
from tests.models.test_diffusion_dit import dit_ldm
from tests.models.test_diffusion_module import TINY_UNET
from tests.nn.test_unet import _randomise

UNET_MULTIPLE = (2, "the UNet's downsampling 2")


@pytest.fixture(scope="module")
def ldm(tmp_path_factory: pytest.TempPathFactory) -> LatentDiffusionModule:
    """16 px images, f = 2 VQ latents scaled by 0.7, a random UNet: 8x8 latents."""
    torch.manual_seed(0)
    ae = write_checkpoint(tiny_autoencoder(), tmp_path_factory.mktemp("ae") / "ae.ckpt")
    module = LatentDiffusionModule(unet=TINY_UNET, first_stage={"ckpt_path": str(ae)},
                                   image_size=16, scale_factor=0.7, sampling={"steps": 4})
    _randomise(module.unet)
    return module.eval()


def images(n: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize(("size", "factor", "multiple", "latent"),
                         [(16, 2, UNET_MULTIPLE, 8), (64, 4, (4, "m"), 16), (15, 1, (1, ""), 15)])
def test_latent_size_is_the_image_size_over_f(size, factor, multiple, latent) -> None:
    assert latent_size(size, factor, multiple, "image_size") == latent


@pytest.mark.parametrize(
    ("size", "factor", "match"),
    [
        (17, 2, "image_size=17 is not divisible by the first stage's factor f=2; valid sizes: "
                "multiples of 4, e.g. 16 or 20"),
        (18, 2, r"image_size=18 gives latents that the backbone cannot take: latents are 9x9 "
                r"\(image_size 18 / f 2\), not divisible by the UNet's downsampling 2; valid "
                "sizes: multiples of 4, e.g. 16 or 20"),
        (2, 2, "image_size=2 .* not divisible by the UNet's downsampling 2; valid sizes: "
               "multiples of 4, e.g. 4$"),
        (-8, 2, "image_size=-8 is not a positive size; valid sizes: multiples of 4, e.g. 4$"),
    ],
)
def test_a_size_the_model_cannot_take_names_the_valid_ones(size, factor, match) -> None:
    with pytest.raises(ValueError, match=match):
        latent_size(size, factor, UNET_MULTIPLE, "image_size")


def test_a_larger_canvas_is_sampled_by_the_convolutional_unet(ldm) -> None:
    assert torch.equal(ldm.sample(n=2, seed=0, image_size=16), ldm.sample(n=2, seed=0))
    large = ldm.sample(n=2, seed=0, image_size=32)
    assert large.shape == (2, 3, 32, 32) and large.std() > 0.01
    with pytest.raises(ValueError, match="image_size=18 gives latents .* multiples of 4"):
        ldm.sample(n=1, image_size=18)


def test_a_dit_samples_a_larger_canvas_and_refuses_a_size_its_patches_do_not_tile() -> None:
    dit = dit_ldm(patch_size=4)  # 8 px, a 2x2 grid of 4x4 patches, sin-cos positions
    assert dit.sample(n=2, seed=0, image_size=16).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="image_size=10 .* not divisible by the DiT's "
                                         "patch_size 4.*valid sizes: multiples of 4, e.g. 8 or 12"):
        dit.sample(n=1, image_size=10)


def test_strength_zero_returns_the_autoencoders_reconstruction(ldm) -> None:
    x = images(2)
    reconstruction = ldm.first_stage.decode(ldm.first_stage.encode(x)).clamp(-1, 1)
    edited = ldm.sample(n=2, init_images=x, strength=0.0)
    torch.testing.assert_close(edited, reconstruction, atol=1e-5, rtol=1e-5)
    assert (edited - x).abs().mean() > 0.05  # an untrained autoencoder: not the image itself


def test_strength_one_is_sampling_from_noise_and_one_image_serves_all(ldm) -> None:
    x = images(1)
    assert torch.equal(ldm.sample(n=3, seed=5, init_images=x, strength=1.0),
                       ldm.sample(n=3, seed=5))
    half = ldm.sample(n=3, seed=5, init_images=x, strength=0.5)
    torch.testing.assert_close(half, ldm.sample(n=3, seed=5, init_images=x.expand(3, -1, -1, -1),
                                                strength=0.5))
    assert not torch.allclose(half, ldm.sample(n=3, seed=5), atol=1e-3)
    # A larger canvas edits larger images.
    large = ldm.sample(n=1, image_size=32, init_images=images(1, 32), strength=0.0)
    reconstruction = ldm.first_stage.decode(ldm.first_stage.encode(images(1, 32))).clamp(-1, 1)
    torch.testing.assert_close(large, reconstruction, atol=1e-5, rtol=1e-5)


def test_guided_edits_follow_the_labels() -> None:
    ldm = tiny_ldm(conditioning_config("class", num_classes=18, class_route="both", width=8))
    x, guided = images(1, 8), {"guidance_scale": 3.0, "seed": 2}
    assert torch.equal(ldm.sample(n=2, labels=[0, 5], init_images=x, strength=1.0, **guided),
                       ldm.sample(n=2, labels=[0, 5], **guided))
    edit = ldm.sample(n=2, labels=[0, 5], init_images=x, strength=0.6, **guided)
    other = ldm.sample(n=2, labels=[3, 1], init_images=x, strength=0.6, **guided)
    assert not torch.allclose(edit, other, atol=1e-3)


def test_init_images_of_the_wrong_shape_are_refused(ldm) -> None:
    with pytest.raises(ValueError, match=r"init images must be \[1 or 2, 3, 16, 16\] .* got "
                                         r"\(1, 3, 32, 32\); resize them"):
        ldm.sample(n=2, init_images=images(1, 32), strength=0.5)
    with pytest.raises(ValueError, match="strength=0.5 applies to image-to-image"):
        ldm.sample(n=2, strength=0.5)

