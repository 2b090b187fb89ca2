"""Every experiment composes; unknown keys and experiments fail before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from tests.hydra_utils import compose_config

EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")
)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(name: str, tmp_path: Path) -> None:
    cfg = compose_config([f"+experiment={name}"], tmp_path)
    resolved = OmegaConf.to_container(cfg.model, resolve=True)
    assert cfg.task_name == name
    assert resolved["_target_"].startswith("ldm_lightning.models.")
    assert cfg.data._target_.startswith("ldm_lightning.data.")


def test_real_data_experiments_start_from_compvis_defaults(tmp_path: Path) -> None:
    vq = compose_config(["+experiment=pets_vq"], tmp_path).model
    assert (vq.ch, list(vq.ch_mult), vq.num_res_blocks, vq.embed_dim, vq.n_embed, vq.beta) == (
        128,
        [1, 2, 4],
        2,
        3,
        8192,
        0.25,
    )
    assert vq.loss.disc_weight == 0.75 and list(vq.optimizer.betas) == [0.5, 0.9]
    assert vq.optimizer.base_lr == 4.5e-6 and vq.optimizer.scale_lr
    kl = compose_config(["+experiment=pets_kl"], tmp_path).model
    assert (
        kl.regularizer,
        list(kl.ch_mult),
        kl.loss.kl_weight,
        kl.loss.disc_start,
        kl.loss.disc_weight,
    ) == ("kl", [1, 2, 4, 4], 1e-6, 50001, 0.5)


def test_unknown_experiment_is_a_hydra_error(tmp_path: Path) -> None:
    with pytest.raises(MissingConfigException, match="experiment"):
        compose_config(["+experiment=does_not_exist"], tmp_path)


def test_unknown_key_is_a_hydra_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="bogus"):
        compose_config(["+experiment=shapes_vq", "model.bogus=1"], tmp_path)


@pytest.mark.parametrize(
    "experiment,millions", [("pets_ddpm", (12, 16)), ("celebahq_ldm", (270, 290))]
)
def test_unet_sizes_match_their_references(
    experiment: str, millions: tuple, tmp_path: Path
) -> None:
    """pets_ddpm: the ~13M pixel-space pets DDPM; celebahq_ldm: CompVis' ~274M LDM-VQ-4."""
    from ldm_lightning.nn.unet import UNetModel

    unet = OmegaConf.to_container(
        compose_config([f"+experiment={experiment}"], tmp_path).model.unet
    )
    assert unet.pop("_target_") == f"{UNetModel.__module__}.{UNetModel.__qualname__}"
    unet["in_channels"] = unet["out_channels"] = 3
    count = sum(p.numel() for p in UNetModel(**unet).parameters()) / 1e6
    assert millions[0] < count < millions[1]


BACKBONES = Path(__file__).parents[1] / "conf" / "model" / "backbone"


def test_ldm_selects_the_unet_backbone_at_model_unet(tmp_path: Path) -> None:
    unet = compose_config(["model=ldm"], tmp_path).model.unet
    assert OmegaConf.to_container(unet) == OmegaConf.to_container(
        OmegaConf.load(BACKBONES / "unet.yaml")
    )


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if "ldm" in e or "ddpm" in e])
def test_a_dit_replaces_an_experiments_unet_whole(name: str, tmp_path: Path) -> None:
    """``model/backbone=dit_s`` after any diffusion experiment gives dit_s.yaml's keys, none of
    the UNet sizes the experiment chose (it chooses them as a backbone option)."""
    base = compose_config([f"+experiment={name}"], tmp_path).model
    dit = compose_config([f"+experiment={name}", "model/backbone=dit_s"], tmp_path).model
    assert OmegaConf.to_container(dit.unet) == OmegaConf.to_container(
        OmegaConf.load(BACKBONES / "dit_s.yaml")
    )
    others = {key for key in base if key != "unet"}
    assert {key: dit[key] for key in others} == {key: base[key] for key in others}


@pytest.mark.parametrize(("size", "widths"), [
    ("b", (768, 12, 12)), ("l", (1024, 24, 16)), ("xl", (1152, 28, 16)), ("shapes", (192, 6, 6)),
])
def test_dit_sizes_are_dit_s_with_table_1s_sizes(size: str, widths: tuple, tmp_path: Path) -> None:
    unet = compose_config(["model=ldm", f"model/backbone=dit_{size}"], tmp_path).model.unet
    small = OmegaConf.load(BACKBONES / "dit_s.yaml")
    assert (unet.hidden_size, unet.depth, unet.num_heads) == widths
    assert {k: v for k, v in unet.items() if k not in ("hidden_size", "depth", "num_heads")} == {
        k: v for k, v in small.items() if k not in ("hidden_size", "depth", "num_heads")
    }
