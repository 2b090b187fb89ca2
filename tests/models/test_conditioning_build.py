"""Conditioning kinds as classes: chosen by ``_target_``, rebuilt from a checkpoint alone, and
checkpoints of the one ``Conditioning`` class that switched on ``kind`` still load.

Before the kinds were classes, the LDM saved ``hparams.conditioning = {kind: none | class |
text, <options>}`` (a pretrained CLIP text encoder was ``kind: text`` with ``text_pretrained``),
and the conditioner's weights under ``conditioner.classes.*`` and ``conditioner.text.*``, as
now. :func:`previous_layout` rewrites a checkpoint of today into that layout; that it is the
same was checked against checkpoints written by commit a7eaa2b (tiny class, text, pretrained
text and unconditional LDMs from the Python API, and shapes_ldm_class / shapes_ldm_text runs):
the same entries, and today's code samples them bit for bit as that code did.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm_lightning.models import ConditionerModule, LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.models.conditioner import ENCODERS
from ldm_lightning.models.conditioning import (
    KINDS,
    ClassConditioning,
    NoConditioning,
    PretrainedTextConditioning,
    TextConditioning,
    build_conditioning,
)
from tests.checkpoint_utils import write_checkpoint
from tests.clip_utils import write_tiny_clip
from tests.hydra_utils import compose_config
from tests.models.test_conditioning import CAPTIONS, TEXT, conditioning_config, tiny_ldm

CONF = Path(__file__).parents[2] / "conf" / "model" / "conditioning"
PROMPTS = ["a red circle on a gray background", "a blue square on a white background"]
# The condition each kind samples with, and the overrides its yaml needs on tiny shapes.
SAMPLING = {"none": {}, "class": {"labels": [0, 17]}, "text": {"prompts": PROMPTS},
            "pretrained_text": {"prompts": PROMPTS}}
TINY_TEXT = ["model.conditioning.text_ckpt_path=null", "model.conditioning.width=8",
             *(f"model.conditioning.text.{k}={v}" for k, v in TEXT.items())]
# Today's state dict names of each kind's encoder (the weights of older checkpoints load).
ENCODER_KEYS = {"none": set(), "class": {"conditioner.classes.embedding.weight"},
                "text": {"conditioner.text.transformer.", "conditioner.text._extra_state"},
                "pretrained_text": {"conditioner.text.model.", "conditioner.text._extra_state"}}
OLD_KIND = {"none": "none", "class": "class", "text": "text", "pretrained_text": "text"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A text conditioner checkpoint and a tiny transformers CLIP folder."""
    root = tmp_path_factory.mktemp("sources")
    clip = ConditionerModule(encoder={"_target_": ENCODERS["text"], **TEXT}, width=16,
                             first_stage={"identity": True}, embed_dim=8,
                             image_encoder={"channels": [8]})
    clip.encoder.fit_tokenizer(CAPTIONS)
    return {"conditioner": write_checkpoint(clip, root / "clip.ckpt"),
            "pretrained": write_tiny_clip(root / "tiny_clip")}


def option_overrides(kind: str, sources: dict[str, Path]) -> list[str]:
    return {
        "none": [],
        "class": ["model.conditioning.num_classes=18", "model.conditioning.class_route=both",
                  "model.conditioning.width=8"],
        "text": TINY_TEXT,
        "pretrained_text": [f"model.conditioning.text_pretrained={sources['pretrained']}"],
    }[kind]


def composed(overrides: list[str], tmp_path: Path) -> dict:
    cfg = compose_config(["+experiment=shapes_ldm", *overrides], tmp_path)
    return OmegaConf.to_container(cfg.model.conditioning, resolve=True)


def test_the_config_group_has_one_option_per_kind() -> None:
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_option_builds_its_class_and_its_record_rebuilds_it(kind, sources, tmp_path):
    config = composed([f"model/conditioning={kind}", *option_overrides(kind, sources)], tmp_path)
    module, record = build_conditioning(config)
    assert type(module) is KINDS[kind] and record["kind"] == kind
    if kind == "text":
        module.text.fit_tokenizer(CAPTIONS)
    rebuilt, again = build_conditioning(record)
    rebuilt.load_state_dict(module.state_dict())
    assert again == record and rebuilt.unet_kwargs() == module.unet_kwargs()
    if module.is_conditional:
        for a, b in zip(*(m.eval().for_sampling(2, **SAMPLING[kind]) for m in (module, rebuilt)),
                        strict=True):
            assert a.keys() == b.keys()
            for name in a:
                torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def previous_layout(path: Path, out: Path) -> Path:
    """``path``'s LDM checkpoint as the code before the conditioning classes wrote it (see
    the module docstring): ``{kind, trust_checkpoint, <options>}`` (a yaml run also saved
    ``text_pretrained: null`` for text), no ``_target_``; the weights as they are."""
    checkpoint = torch.load(path, weights_only=True)
    config = dict(checkpoint["hyper_parameters"]["conditioning"])
    del config["_target_"]
    kind = config.pop("kind")
    old = {"kind": OLD_KIND[kind], "trust_checkpoint": False, **config}
    if kind == "text":
        old["text_pretrained"] = None
    checkpoint["hyper_parameters"]["conditioning"] = old
    torch.save(checkpoint, out)
    return out


def conditional_ldm(kind: str, sources: dict[str, Path]) -> LatentDiffusionModule:
    arguments = {
        "none": {},
        "class": {"num_classes": 18, "class_route": "both", "width": 8, "num_tokens": 2},
        "text": {"text_ckpt_path": str(sources["conditioner"]), "trust_checkpoint": False},
        "pretrained_text": {"text_pretrained": str(sources["pretrained"])},
    }[kind]
    torch.manual_seed(0)
    return tiny_ldm(conditioning_config(kind, **arguments))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_checkpoints_of_the_previous_layout_load_and_sample_the_same(kind, sources, tmp_path):
    new = write_checkpoint(conditional_ldm(kind, sources), tmp_path / "new.ckpt")
    old = previous_layout(new, tmp_path / "old.ckpt")
    names = {k for k in torch.load(old, weights_only=True)["state_dict"]
             if k.startswith("conditioner.")}
    assert {k for k in names if not any(k.startswith(p) for p in ENCODER_KEYS[kind])} == set()
    assert len(names) >= len(ENCODER_KEYS[kind])
    models = [load_stage(LatentDiffusionModule, p, "latent_diffusion") for p in (new, old)]
    assert type(models[1].conditioner) is KINDS[kind]
    assert models[1].hparams.conditioning == models[0].hparams.conditioning
    samples = [m.sample(n=4, guidance_scale=3.0, seed=1, **SAMPLING[kind]) for m in models]
    torch.testing.assert_close(samples[1], samples[0], rtol=0, atol=0)


def test_conditioner_checkpoints_keep_their_encoder_names(sources) -> None:
    state = torch.load(sources["conditioner"], weights_only=True)["state_dict"]
    assert "encoder._extra_state" in state and "encoder.transformer.ln_final.weight" in state
    encoder = TextConditioning(text_ckpt_path=str(sources["conditioner"])).text
    expected = load_stage(ConditionerModule, sources["conditioner"], "conditioner").encoder
    torch.testing.assert_close(encoder(PROMPTS), expected(PROMPTS), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("config", "cls"),
    [(None, NoConditioning), ({}, NoConditioning),
     ({"kind": "none", "trust_checkpoint": False}, NoConditioning),
     ({"kind": "class", "num_classes": 3, "trust_checkpoint": False}, ClassConditioning),
     ({"kind": "text", "text_pretrained": None, "text": TEXT}, TextConditioning),
     ({"kind": "text", "text_pretrained": "<pretrained>", "width": 128},
      PretrainedTextConditioning)],
)
def test_configs_of_earlier_versions_pick_their_class(config, cls, sources) -> None:
    if config and config.get("text_pretrained") == "<pretrained>":
        config = {**config, "text_pretrained": str(sources["pretrained"])}
    module, record = build_conditioning(config)
    assert type(module) is cls and record["_target_"].endswith(cls.__name__)
    assert "trust_checkpoint" not in record or cls is TextConditioning


def test_kind_no_longer_switches_and_says_what_does(tmp_path) -> None:
    config = composed(["model.conditioning.kind=class"], tmp_path)
    with pytest.raises(ValueError, match=r"model/conditioning=class instead"):
        build_conditioning(config)
    with pytest.raises(ValueError, match=r"kind='clip' is unknown.*model/conditioning=<none"):
        build_conditioning({"kind": "clip"})


def test_options_of_another_kind_are_named(tmp_path) -> None:
    cfg = compose_config(["+experiment=shapes_ldm_text", "model/conditioning=class",
                          "model.conditioning.num_classes=18"], tmp_path)
    with pytest.raises(ValueError, match=r"has freeze_text, text, not options of "
                                         r"model/conditioning=class"):
        build_conditioning(OmegaConf.to_container(cfg.model.conditioning, resolve=True))


@pytest.mark.parametrize("target", ["os.system", "torch.nn.Linear", "this.Zen",
                                    "ldm_lightning.models.conditioning.Missing"])
def test_a_target_must_name_a_conditioning_class_and_imports_nothing_else(target) -> None:
    assert "this" not in sys.modules  # importing it prints the Zen of Python
    with pytest.raises(ValueError, match="is not a conditioning class"):
        build_conditioning({"_target_": target})
    assert "this" not in sys.modules
