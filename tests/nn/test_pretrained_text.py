"""A transformers CLIP text encoder behind the caption-encoder interface, built offline.

The fixture writes a tiny randomly initialised CLIPTextModel and a byte-level BPE tokenizer
with CLIP's special tokens to a folder with ``save_pretrained``: the layout of a downloaded
``openai/clip-vit-large-patch14``, without the network.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage, stamp
from ldm_lightning.models.conditioning import PretrainedTextConditioning, build_conditioning
from ldm_lightning.nn.pretrained_text import PretrainedTextEncoder
from tests.clip_utils import BOS, CONTEXT, EOS, write_tiny_clip

PRETRAINED = "ldm_lightning.models.conditioning.PretrainedTextConditioning"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_context_and_pooled_shapes_and_pooled_is_the_eos_state(clip_folder: Path) -> None:
    encoder = PretrainedTextEncoder(str(clip_folder)).eval()
    captions = ["a red circle on a gray background", "a cyan square"]
    with torch.no_grad():
        context, pooled = encoder(captions)
    assert encoder.width == 32 and encoder.context_length == CONTEXT
    assert context.shape == (2, CONTEXT, 32) and pooled.shape == (2, 32)
    ids = encoder.tokenize(captions)
    eos = encoder.tokenizer.convert_tokens_to_ids(EOS)
    first_eos = (ids == eos).int().argmax(dim=1)
    torch.testing.assert_close(pooled, context[torch.arange(2), first_eos])
    assert (ids[:, 0] == encoder.tokenizer.convert_tokens_to_ids(BOS)).all()


def test_its_record_rebuilds_it_and_says_where_it_came_from(clip_folder: Path) -> None:
    encoder = PretrainedTextEncoder(str(clip_folder))
    rebuilt = PretrainedTextEncoder.from_record(encoder.record())
    rebuilt.load_state_dict(encoder.state_dict())
    assert rebuilt.record() == encoder.record()
    assert encoder.record()["name_or_path"] == str(clip_folder)
    captions = ["a red circle on a gray background"]
    torch.testing.assert_close(rebuilt.eval()(captions)[0], encoder.eval()(captions)[0])


def test_over_long_prompts_are_truncated_with_a_warning(clip_folder: Path) -> None:
    encoder = PretrainedTextEncoder(str(clip_folder))
    long = " ".join(["a red circle on a gray background"] * 4)
    with pytest.warns(UserWarning, match="truncated"):
        ids = encoder.tokenize([long])
    assert ids.shape == (1, CONTEXT)


def test_a_missing_model_names_the_path_and_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="(?s)nowhere.*save_pretrained.*hub id"):
        PretrainedTextEncoder(str(tmp_path / "nowhere"))


def test_conditioning_freezes_it_and_the_empty_prompt_is_the_null_context(clip_folder) -> None:
    conditioning = PretrainedTextConditioning(text_pretrained=str(clip_folder)).eval()
    assert conditioning.frozen and conditioning.unet_kwargs() == {"context_dim": 32}
    assert not any(p.requires_grad for p in conditioning.text.parameters())
    cond, uncond = conditioning.for_sampling(2, prompts=["", "a red circle"])
    torch.testing.assert_close(cond["context"][0], uncond["context"][0])
    assert not torch.allclose(cond["context"][1], uncond["context"][1])
    with pytest.raises(ValueError, match="not both"):
        build_conditioning(
            {"kind": "text", "text_pretrained": str(clip_folder), "text_ckpt_path": "x.ckpt"}
        )


def test_a_diffusion_checkpoint_samples_without_the_pretrained_folder(
    clip_folder: Path, tmp_path: Path
) -> None:
    """Weights, config and tokenizer travel in the LDM checkpoint: delete the folder, reload."""
    local = tmp_path / "clip"
    shutil.copytree(clip_folder, local)
    ldm = LatentDiffusionModule(
        unet={"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
              "attention_resolutions": [2], "num_head_channels": 8},
        first_stage={"identity": True}, image_size=8,
        schedule={"kind": "linear", "timesteps": 100}, scale_factor=1.0,
        conditioning={"_target_": PRETRAINED, "text_pretrained": str(local)}, sampling={"steps": 3},
    ).eval()
    for parameter in ldm.unet.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    prompts = ["a red circle on a gray background"]
    before = ldm.sample(n=2, prompts=prompts, guidance_scale=3.0, seed=0)
    checkpoint = {"state_dict": ldm.state_dict(), "hyper_parameters": dict(ldm.hparams)}
    stamp(checkpoint, "latent_diffusion", ldm)
    torch.save(checkpoint, tmp_path / "ldm.ckpt")
    shutil.rmtree(local)

    reloaded = load_stage(LatentDiffusionModule, tmp_path / "ldm.ckpt", "latent_diffusion").eval()
    assert reloaded.conditioner.frozen
    after = reloaded.sample(n=2, prompts=prompts, guidance_scale=3.0, seed=0)
    torch.testing.assert_close(after, before)
