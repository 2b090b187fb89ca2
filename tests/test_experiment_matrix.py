"""Every experiment trains (``fast_dev_run`` through ``ldm_lightning.train.train``) with every
datamodule it can meaningfully take: an experiment names only what it changes, so
``+experiment=<any> data=<any>`` composes, and the latent cache works for every datamodule.

An experiment ``<dataset>_<kind>`` needs of its data what ``NEEDS[kind]`` says; a datamodule
(as the fake layouts below lay it out) offers what ``OFFERS`` says. A pair runs when the offer
covers the need; ``EXCLUDED`` lists the pairs left out and why. The whole product runs by
default: about a minute on 2 CPU cores (107 tests in 53 s).
"""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
from omegaconf import DictConfig

from ldm_lightning.models.from_data import fill_from_data
from ldm_lightning.train import train
from tests.data.fake_layouts import make_fake_celebahq, make_fake_pets, write_semantic_maps
from tests.data.test_datamodule_cache import BREEDS, captioned_folder
from tests.hydra_utils import compose_config
from tests.models.test_diffusion_module import autoencoder_ckpt  # noqa: F401 (a fixture)

EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")
)

# What each kind of experiment needs of its data, and why.
NEEDS: dict[str, set[str]] = {
    "vq": set(), "kl": set(), "ldm": set(), "ddpm": set(),  # images alone
    "ldm_class": {"labels"},           # a label per image: class-conditional guidance
    "ldm_text": {"varied captions"},   # captions that tell images apart: text guidance
    "clip": {"varied captions"},       # contrastive caption <-> image matching
    "noisy_classifier": {"labels"},    # a label per image: what it learns to tell apart
    "inpaint": set(), "upscale": set(),  # images alone: masks and low-resolution images are
                                         # made from them
    "semantic": {"semantic maps"},     # a map per image (model.spatial.batch_key)
    # 3-10 images of one new concept (data=instance) and a trained conditional LDM: no
    # datamodule below; tests/models/test_finetune.py trains these experiments.
    "finetune": {"instance images"},
}
# What each datamodule offers. "celebahq_faces" is CelebA-HQ as a plain folder of faces: every
# image is label 0 with the caption "a photo of a face", so it offers neither.
OFFERS: dict[str, set[str]] = {
    "shapes": {"labels", "varied captions",         # 18 shape x colour classes, exact captions,
               "semantic maps"},                    # exact shape/background segmentations
    "image_folder": {"labels", "varied captions",   # class folders, "a photo of a <class>",
                     "semantic maps"},              # captions.jsonl lines, segmentation_dir
    "pets": {"labels", "varied captions"},          # breeds, "a photo of a <breed>, a ..."
    "celebahq": {"labels", "varied captions"},      # CelebAMask-HQ: label = Male (2 classes),
                                                    # captions from the 40 attributes
    "celebahq_faces": set(),
}
# Labels of each labelled fake datamodule: what model.conditioning.num_classes=null (and the
# noisy classifier's model.num_classes=null) takes.
NUM_CLASSES = {"shapes": 18, "image_folder": 3, "pets": len(BREEDS), "celebahq": 2}


# The demo's pair (`make demo`): a KL autoencoder and a class-conditional LDM; the f=8 shapes
# autoencoder; the equal-budget comparison, a class-conditional LDM (its default variant, pixel
# space, reads no first stage).
ALIASES = {"demo_kl": "kl", "demo_ldm": "ldm_class", "kl_f8": "kl", "compare": "ldm_class"}


def kind(experiment: str) -> str:
    """``shapes_ldm_text`` -> ``ldm_text``; ``shapes_demo_ldm`` -> ``ldm_class``; ``finetune``
    -> ``finetune``."""
    name = experiment.split("_", 1)[-1]
    return ALIASES.get(name, name)


def meaningful(experiment: str) -> list[str]:
    return [data for data, offer in OFFERS.items() if NEEDS[kind(experiment)] <= offer]


EXCLUDED = {
    (experiment, data): f"{data} lacks {sorted(NEEDS[kind(experiment)] - OFFERS[data])}"
    for experiment in EXPERIMENTS for data in OFFERS if data not in meaningful(experiment)
}
MATRIX = [pytest.param(e, d, id=f"{e}-{d}") for e in EXPERIMENTS for d in meaningful(e)]

TINY_AUTOENCODER = [
    "model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.loss.disc_ndf=8",
    # LPIPS's VGG16 would triple the time of these runs; tests/test_real_data_experiments.py
    # keeps it on.
    "model.loss.disc_num_layers=2", "model.loss.perceptual_weight=0",
]
TINY_UNET = [
    "model.unet.model_channels=16", "model.unet.channel_mult=[1,2]",
    "model.unet.num_res_blocks=1", "model.unet.attention_resolutions=[2]",
    "model.unet.num_head_channels=8", "model.sampling.steps=2", "model.num_log_images=2",
    "model.scale_factor_batches=2",
]
TINY_TEXT = ["text.layers=1", "text.heads=2", "text.context_length=16", "width=16"]
TINY: dict[str, list[str]] = {
    "vq": [*TINY_AUTOENCODER, "model.n_embed=16"],
    "kl": TINY_AUTOENCODER,
    "clip": ["model.width=16", "model.encoder.layers=1", "model.encoder.heads=2",
             "model.encoder.context_length=16", "model.image_encoder.channels=[8,16]",
             "model.embed_dim=8"],
    "ldm": TINY_UNET,
    "ddpm": TINY_UNET,
    "ldm_class": TINY_UNET,
    "inpaint": TINY_UNET,
    "upscale": TINY_UNET,
    "semantic": [*TINY_UNET, "model.spatial.num_classes=2"],  # the fake maps' classes
    "noisy_classifier": [
        "model.classifier.model_channels=16", "model.classifier.channel_mult=[1,2]",
        "model.classifier.num_res_blocks=1", "model.classifier.attention_resolutions=[2]",
        "model.classifier.num_head_channels=8", "model.scale_factor_batches=2",
    ],
    "ldm_text": [*TINY_UNET, "model.conditioning.text_ckpt_path=null",
                 "model.conditioning.freeze_text=false",
                 *(f"model.conditioning.{o}" for o in TINY_TEXT)],
}
ON_THIS_MACHINE = ["debug=fdr", "trainer=cpu", "logger=csv", "data.image_size=16",
                   "data.batch_size=2", "data.num_workers=0"]


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """``data=...`` and its sizes for each fake datamodule, written once per module."""
    root = tmp_path_factory.mktemp("data")
    folder = captioned_folder(root / "folder", {"bird": 4, "cat": 4, "dog": 4})
    maps = write_semantic_maps(folder, root / "maps")  # 2 classes: red 0 | blue 1
    make_fake_pets(root, breeds=BREEDS)
    make_fake_celebahq(root / "celebahq", n=8)
    make_fake_celebahq(root / "faces", n=8, layout="folder")
    return {
        "shapes": ["data=shapes", "data.num_train=8", "data.num_val=4", "data.num_test=4"],
        "image_folder": ["data=image_folder", f"data.root={folder}", "data.val_fraction=0.25",
                         f"data.segmentation_dir={maps}"],
        "pets": ["data=pets", f"data.root={root}", "data.download=false",
                 f"data.classes=[{','.join(BREEDS)}]"],
        "celebahq": ["data=celebahq", f"data.root={root / 'celebahq'}", "data.num_train=6"],
        "celebahq_faces": ["data=celebahq", f"data.root={root / 'faces'}", "data.num_train=6"],
    }


def experiment_config(experiment: str, data: str, data_overrides: dict[str, list[str]],
                      first_stage: Path, tmp_path: Path) -> DictConfig:
    """The experiment on ``data``, tiny, with the first stage and class count it needs."""
    overrides = [f"+experiment={experiment}", *data_overrides[data], *ON_THIS_MACHINE,
                 *TINY[kind(experiment)]]
    if kind(experiment) in ("clip", "ldm", "ldm_class", "ldm_text", "noisy_classifier",
                            "inpaint", "upscale", "semantic"):
        overrides.append(f"model.first_stage.ckpt_path={first_stage}")
    if kind(experiment) == "ldm_class":
        overrides.append("model.conditioning.num_classes=null")  # from the data
    return compose_config(overrides, tmp_path)


def test_only_conditioned_experiments_on_unlabelled_uncaptioned_data_are_left_out(
    data_overrides: dict[str, list[str]],
) -> None:
    assert set(OFFERS) == set(data_overrides)
    conditioned = {e for e in EXPERIMENTS
                   if kind(e) in ("ldm_class", "ldm_text", "clip", "noisy_classifier")}
    # Shapes renders exact maps, an image folder reads them from segmentation_dir.
    mapped = {(e, d) for e in EXPERIMENTS if kind(e) == "semantic" for d in OFFERS
              if d not in ("shapes", "image_folder")}
    finetune = {(e, data) for e in EXPERIMENTS if kind(e) == "finetune" for data in OFFERS}
    assert set(EXCLUDED) == {(e, "celebahq_faces") for e in conditioned} | mapped | finetune


@pytest.mark.parametrize(("experiment", "data"), MATRIX)
def test_experiment_trains_on_datamodule(
    experiment: str, data: str, data_overrides: dict[str, list[str]],
    autoencoder_ckpt: Path, tmp_path: Path,  # noqa: F811 (the imported fixture)
) -> None:
    cfg = experiment_config(experiment, data, data_overrides, autoencoder_ckpt, tmp_path)
    if kind(experiment) in ("ldm_class", "noisy_classifier"):
        filled = fill_from_data(cfg.model, hydra.utils.instantiate(cfg.data))
        classes = filled.num_classes if "num_classes" in filled else filled.conditioning.num_classes
        assert classes == NUM_CLASSES[data]
    metrics = train(cfg)
    assert math.isfinite(metrics[cfg.optimized_metric])
    if cfg.data.cache_latents:
        manifests = Path(cfg.data.cache_dir).glob("*/manifest.json")
        cached = sorted(p.parent.name.split("-")[1] for p in manifests)
        assert cached == ["test", "train", "val"]
