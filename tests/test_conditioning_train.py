"""Conditional stages end to end on tiny shapes: CLIP pretraining, class and text LDMs."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
import transformers

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import checkpoint_kind, load_stage
from ldm_lightning.train import train
from tests.clip_utils import write_tiny_clip
from tests.hydra_utils import TINY_AUTOENCODER, compose_config

TINY_DATA = [o for o in TINY_AUTOENCODER if o.startswith(("data.", "trainer.", "logger"))]
TINY_CLIP = [
    "model.width=16",
    "model.encoder.vocab_size=400",
    "model.encoder.layers=1",
    "model.encoder.heads=2",
    "model.image_encoder.channels=[8,16]",
    "model.embed_dim=8",
]
TINY_LDM = [
    "model.unet.model_channels=16",
    "model.unet.channel_mult=[1,2]",
    "model.unet.attention_resolutions=[2]",
    "model.unet.num_head_channels=8",
    "model.num_log_images=4",
    "model.sampling.steps=2",
    "model.scale_factor_batches=2",
    "test=false",
]


@pytest.fixture(scope="module")
def vq_ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("vq")
    train(compose_config(["+experiment=shapes_vq", *TINY_AUTOENCODER, "test=false"], run))
    return run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def clip_ckpt(vq_ckpt, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("clip")
    overrides = ["+experiment=shapes_clip", *TINY_DATA, *TINY_CLIP,
                 f"model.first_stage.ckpt_path={vq_ckpt}"]
    metrics = train(compose_config(overrides, run))
    for name in ("recall@1_i2t", "recall@5_i2t", "recall@1_t2i", "recall@5_t2i"):
        assert 0.0 <= metrics[f"val/{name}"] <= 1.0 and 0.0 <= metrics[f"test/{name}"] <= 1.0
    # 8 validation images over at most 8 distinct captions: recall@5 >= 5/8 at random.
    assert metrics["val/recall@5_i2t"] >= metrics["val/recall@1_i2t"]
    return run / "checkpoints" / "last.ckpt"


def test_shapes_clip_fast_dev_run(vq_ckpt, tmp_path):
    overrides = ["+experiment=shapes_clip", "debug=fdr", *TINY_DATA, *TINY_CLIP,
                 f"model.first_stage.ckpt_path={vq_ckpt}"]
    metrics = train(compose_config(overrides, tmp_path))
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_text_conditional_ldm_trains_saves_and_samples_with_guidance(vq_ckpt, clip_ckpt, tmp_path):
    assert checkpoint_kind(torch.load(clip_ckpt, weights_only=False)) == "conditioner"
    overrides = ["+experiment=shapes_ldm_text", *TINY_DATA, *TINY_LDM,
                 f"model.first_stage.ckpt_path={vq_ckpt}",
                 f"model.conditioning.text_ckpt_path={clip_ckpt}"]
    train(compose_config(overrides, tmp_path))
    ldm = load_stage(LatentDiffusionModule, tmp_path / "checkpoints" / "last.ckpt",
                     "latent_diffusion")
    assert ldm.conditioner.frozen and ldm.unet.context_dim == 16
    prompts = ["a red circle on a gray background", "a blue square on a white background"]
    images = ldm.sample(n=4, prompts=prompts, guidance_scale=3.0, steps=2)
    assert images.shape == (4, 3, 16, 16) and images.abs().max() <= 1
    again = ldm.sample(n=4, prompts=prompts, guidance_scale=3.0, steps=2)
    torch.testing.assert_close(images, again)
    with pytest.raises(ValueError, match="text-conditional"):
        ldm.sample(n=2, steps=2)


def test_ldm_on_a_pretrained_transformers_clip_text_encoder(vq_ckpt, tmp_path):
    """model/conditioning=pretrained_text: a save_pretrained folder (here a tiny random CLIP),
    frozen, recorded."""
    clip = write_tiny_clip(tmp_path / "clip")
    overrides = ["+experiment=shapes_ldm", "model/conditioning=pretrained_text", *TINY_DATA,
                 *TINY_LDM, f"model.first_stage.ckpt_path={vq_ckpt}",
                 f"model.conditioning.text_pretrained={clip}"]
    train(compose_config(overrides, tmp_path / "run"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ldm = load_stage(LatentDiffusionModule, checkpoint, "latent_diffusion")
    assert ldm.conditioner.frozen and ldm.unet.context_dim == 32
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    pretrained = transformers.CLIPTextModel.from_pretrained(clip).state_dict()
    for name, tensor in pretrained.items():  # frozen: the pretrained weights, unchanged
        torch.testing.assert_close(saved[f"conditioner.text.model.{name}"], tensor)
    images = ldm.sample(n=2, prompts=["a red circle on a gray background"], guidance_scale=3.0,
                        steps=2)
    assert images.shape == (2, 3, 16, 16)


def test_class_conditional_ldm_trains_saves_and_samples_with_guidance(vq_ckpt, tmp_path):
    overrides = ["+experiment=shapes_ldm_class", *TINY_DATA, *TINY_LDM,
                 f"model.first_stage.ckpt_path={vq_ckpt}"]
    train(compose_config(overrides, tmp_path))
    ldm = load_stage(LatentDiffusionModule, tmp_path / "checkpoints" / "last.ckpt",
                     "latent_diffusion")
    assert ldm.unet.num_classes == 19
    images = ldm.sample(n=4, labels=[0, 17], guidance_scale=3.0, steps=2)
    assert images.shape == (4, 3, 16, 16) and torch.isfinite(images).all()
    torch.testing.assert_close(images, ldm.sample(n=4, labels=[0, 17], guidance_scale=3.0, steps=2))
    with pytest.raises(ValueError, match=r"valid labels are 0..17"):
        ldm.sample(n=2, labels=[18], steps=2)


@pytest.mark.parametrize(
    ("experiment", "kind"),
    [("shapes_ldm_class", "class"), ("shapes_ldm_text", "text"), ("pets_ldm_class", "class"),
     ("pets_ldm_text", "text"), ("celebahq_ldm_text", "text")],
)
def test_conditional_experiments_compose_from_their_base(experiment, kind, tmp_path):
    cfg = compose_config([f"+experiment={experiment}"], tmp_path)
    base = compose_config([f"+experiment={experiment.rsplit('_', 1)[0]}"], tmp_path)
    assert cfg.model.conditioning.kind == kind and cfg.task_name == experiment
    assert cfg.model.unet == base.model.unet and cfg.data == base.data
    assert cfg.model.conditioning.p_uncond == 0.1


def test_class_conditioner_config_builds_a_class_encoder(tmp_path):
    cfg = compose_config(["data=shapes", "model=conditioner_class",
                          "model.encoder.num_classes=18", "model.first_stage.identity=true"],
                         tmp_path)
    module = hydra.utils.instantiate(cfg.model)
    assert module.encoder.embedding.num_embeddings == 19
