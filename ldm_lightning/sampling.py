"""Sampling as library code: the one path from a trained model to images.

``python -m ldm_lightning.sample``, ``python -m ldm_lightning.evaluate`` and the FID callback
all draw their images here:

- :func:`generate`: ``num_samples`` images in batches, batch ``b`` with seed ``seed + b``, so
  the same call gives the same images on any device.
- the conditions of each batch: :func:`batch_conditions` from given labels/prompts (cycled to
  ``num_samples``), or :func:`conditions_from_data` from the labels/captions of real images
  (FID compares like with like).
- :func:`write_samples`: ``grid.png`` and one PNG per sample.
- :func:`guidance_classifier`: the noisy classifier of ``classifier_ckpt`` for classifier
  guidance, loaded as every stage is.
- :func:`load_init_image`: the image image-to-image starts from, at the model's size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm_lightning.data.image_io import image_problem, load_rgb
from ldm_lightning.data.transforms import ResizeCrop
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.models.noisy_classifier import NoisyClassifierModule
from ldm_lightning.utils.cycling import cycle_to
from ldm_lightning.utils.images import save_grid, save_png, to_unit

__all__ = [
    "SAMPLING_KEYS",
    "batch_conditions",
    "conditions_from_data",
    "folder_name",
    "generate",
    "guidance_classifier",
    "load_init_image",
    "per_class_labels",
    "sampling_options",
    "write_samples",
]

# The sampler settings the entry points pass on to LatentDiffusionModule.sample (None: the
# checkpoint's model.sampling).
SAMPLING_KEYS = ("sampler", "steps", "eta", "timestep_spacing", "guidance_scale",
                 "guidance_rescale", "guidance_interval", "classifier_scale")


def sampling_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SAMPLING_KEYS` an entry point's config has, as ``sample`` arguments (plain
    Python values: a list, not a ListConfig, for ``guidance_interval``); the comparison report
    has no classifier guidance."""
    options = {key: config[key] for key in SAMPLING_KEYS if key in config}
    if options.get("guidance_interval") is not None:
        options["guidance_interval"] = [float(v) for v in options["guidance_interval"]]
    return options


def guidance_classifier(
    config: Mapping[str, Any], device: torch.device | str
) -> NoisyClassifierModule | None:
    """The noisy classifier of an entry point's ``classifier_ckpt`` on ``device`` (None when it
    is null), read with ``weights_only`` unless ``trust_checkpoint``, like every stage."""
    if config["classifier_ckpt"] is None:
        return None
    classifier = load_stage(
        NoisyClassifierModule, config["classifier_ckpt"], NoisyClassifierModule.kind,
        config_key="classifier_ckpt", trust=config["trust_checkpoint"],
    )
    return classifier.to(device)


def load_init_image(path: str | Path, size: int) -> torch.Tensor:
    """The image file ``path`` as ``[1, 3, size, size]`` in [-1, 1], as training images are
    read (:func:`~ldm_lightning.data.image_io.load_rgb`: RGB, EXIF orientation; shorter side
    resized to ``size``, centre crop: :class:`~ldm_lightning.data.transforms.ResizeCrop`)."""
    problem = image_problem(path)
    if problem is not None:
        raise ValueError(f"init_image={path} cannot be read as an image ({problem}); give the "
                         "path of a PNG or JPEG file")
    return ResizeCrop(size)(load_rgb(path))[None]


def batch_conditions(
    num_samples: int,
    batch_size: int,
    labels: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
) -> Iterator[dict[str, list[Any]]]:
    """Per-batch ``labels``/``prompts`` inputs, each list cycled to ``num_samples`` first."""
    condition = {"labels": cycle_to(labels, num_samples), "prompts": cycle_to(prompts, num_samples)}
    for start in range(0, num_samples, batch_size):
        stop = min(start + batch_size, num_samples)
        yield {k: v[start:stop] for k, v in condition.items() if v is not None}


def conditions_from_data(
    module: pl.LightningModule, datamodule: Any, split: str, batch_size: int,
    labels: bool = False,
) -> Iterator[dict[str, Any]]:
    """Per-batch sampling inputs (labels/prompts) cycled from the real images of ``split``.

    Conditional models are sampled with the conditions of the real data, so FID compares
    like with like; unconditional models (and modules without a conditioner) get no inputs,
    but the labels with ``labels=True`` (for classifier guidance).
    """
    conditioner = getattr(module, "conditioner", None)
    conditional = conditioner is not None and conditioner.is_conditional
    if not (conditional or labels):
        return itertools.repeat({})
    loader = DataLoader(datamodule.build_split(split, augment=False), batch_size=batch_size)
    # Re-iterate the loader rather than itertools.cycle, which would keep every batch (images
    # included) in memory for the whole run.
    batches = (batch for _ in itertools.count() for batch in loader)

    def inputs(batch: dict[str, Any]) -> dict[str, Any]:
        given = conditioner.sampling_inputs(batch, batch_size) if conditional else {}
        if labels:
            given["labels"] = cycle_to(batch["label"].tolist(), batch_size)
        return given

    return (inputs(batch) for batch in batches)


@torch.no_grad()
def generate(
    module: pl.LightningModule,
    num_samples: int,
    batch_size: int,
    conditions: Iterator[dict[str, Any]] | None = None,
    seed: int = 0,
    progress: bool = False,
    **sampling: Any,
) -> Iterator[torch.Tensor]:
    """Batches of samples ``[b, 3, H, W]`` in [-1, 1]; batch ``i`` uses seed ``seed + i``.

    ``conditions`` yields one dict of ``labels``/``prompts`` per batch (cut to the batch);
    ``sampling``: ``sampler``, ``steps``, ``eta``, ``guidance_scale``, ... of
    :meth:`LatentDiffusionModule.sample` (None: the checkpoint's defaults).
    """
    conditions = conditions if conditions is not None else itertools.repeat({})
    starts = range(0, num_samples, batch_size)
    for index, start in enumerate(tqdm(starts, desc="sampling", disable=not progress)):
        n = min(batch_size, num_samples - start)
        condition = {k: v[:n] for k, v in next(conditions).items()}
        yield module.sample(n=n, seed=seed + index, **sampling, **condition)


def per_class_labels(
    module: pl.LightningModule,
    per_class: int,
    labels: Sequence[int | str] | None = None,
    classifier: NoisyClassifierModule | None = None,
) -> tuple[list[int], list[str]]:
    """``per_class`` labels of every class of a class-conditional ``module``, or of the
    ``classifier`` that guides an unconditional one (or of each of ``labels``, by index or name),
    and the folder name of each: its class name, else its index.
    """
    conditioner = getattr(module, "conditioner", None)
    classes = conditioner if getattr(conditioner, "inputs", None) == "labels" else classifier
    if classes is None:
        raise ValueError(
            "per_class needs a class-conditional checkpoint (or a classifier_ckpt to guide with); "
            "use num_samples"
        )
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    chosen_classes = classes.check(labels).tolist() if labels else range(classes.num_classes)
    names = classes.class_names or [str(i) for i in range(classes.num_classes)]
    chosen = [c for c in chosen_classes for _ in range(per_class)]
    return chosen, [folder_name(names[c]) for c in chosen]


def folder_name(name: str) -> str:
    """``name`` as one path component: separators and a leading dot replaced by "_"."""
    cleaned = "".join("_" if ch in "/\\\0" else ch for ch in name).strip()
    return "_" + cleaned[1:] if cleaned.startswith(".") else cleaned or "_"


def write_samples(
    images: torch.Tensor,
    out_dir: str | Path,
    nrow: int | None = None,
    folders: Sequence[str] | None = None,
) -> Path:
    """``grid.png`` and ``samples/00000.png, ...`` under ``out_dir``, or with ``folders`` (one per
    image) ``samples/<folder>/00000.png, ...`` numbered per folder (the class-folder layout
    evaluation tools read); returns the grid path."""
    out_dir = Path(out_dir)
    counts: dict[str, int] = {}
    for index, image in enumerate(images):
        if folders is None:
            path = out_dir / "samples" / f"{index:05d}.png"
        else:
            number = counts[folders[index]] = counts.get(folders[index], -1) + 1
            path = out_dir / "samples" / folders[index] / f"{number:05d}.png"
        save_png(to_unit(image), path)
    return save_grid(images, out_dir / "grid.png", nrow)
