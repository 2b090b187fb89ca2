"""Scoring what a module makes against real images: what ``evaluate`` and the FID callback share.

A latent diffusion model is scored on its samples (:func:`score_samples`, drawn by
:mod:`ldm_lightning.sampling` with the conditions of the real data), an autoencoder on its
reconstructions of real images (:func:`score_reconstructions`: rFID, and with
``pixel_metrics`` PSNR, SSIM, LPIPS and codebook usage). Both feed a
:class:`~ldm_lightning.metrics.fid.GenerativeMetrics` (or a
:class:`~ldm_lightning.metrics.protocol.MetricSuite`) whose real features are already set; samples
of a text model also a :class:`~ldm_lightning.metrics.clip_score.ClipScore`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ldm_lightning.metrics.clip_score import ClipScore
from ldm_lightning.metrics.fid import GenerativeMetrics
from ldm_lightning.metrics.protocol import MetricSuite
from ldm_lightning.metrics.reconstruction import ReconstructionMetrics
from ldm_lightning.sampling import conditions_from_data, generate

__all__ = ["format_table", "reconstructions", "score_reconstructions", "score_samples"]


@torch.no_grad()
def score_samples(
    module: pl.LightningModule,
    datamodule: Any,
    metrics: GenerativeMetrics | MetricSuite,
    split: str,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    progress: bool = False,
    keep: int = 0,
    clip_score: ClipScore | None = None,
    **sampling: Any,
) -> tuple[dict[str, Any], Tensor | None]:
    """``metrics.compute()`` over ``num_samples`` samples, and the first ``keep`` of them.

    Batch ``b`` has seed ``seed + b`` and the labels/captions of the real images of ``split``
    (the labels also for the ``classifier`` of classifier guidance, when ``sampling`` holds
    one); ``sampling``: :meth:`LatentDiffusionModule.sample` arguments. A ``clip_score`` scores
    each sample against the prompt it was drawn with. The kept images (``[keep, 3, H, W]`` on
    the CPU, for a grid) are None when ``keep`` is 0.
    """
    classifier = sampling.get("classifier") is not None
    conditions = conditions_from_data(module, datamodule, split, batch_size, labels=classifier)
    given: list[dict[str, Any]] = []  # each batch's conditions, as generate drew them
    recorded = (given.append(condition) or condition for condition in conditions)
    samples = generate(
        module, num_samples, batch_size, recorded, seed=seed, progress=progress, **sampling
    )
    kept: list[Tensor] = []
    for images in samples:
        metrics.update(images)
        if clip_score is not None:
            clip_score.update(images, given[-1]["prompts"][: len(images)])
        if sum(map(len, kept)) < keep:
            kept.append(images.cpu())
    results = metrics.compute()
    if clip_score is not None:
        results.update(clip_score.compute())
    return results, torch.cat(kept)[:keep] if kept else None


@torch.no_grad()
def reconstructions(
    module: pl.LightningModule,
    dataset: Dataset,
    batch_size: int,
    limit: int | None = None,
    progress: bool = False,
) -> Iterator[tuple[Tensor, Tensor, dict[str, Any]]]:
    """``(x, x_hat, info)`` per batch of the first ``limit`` images of ``dataset`` (None: all).

    ``x_hat = D(E(x))`` with the posterior mode (KL) or the quantised code (VQ), clamped to
    [-1, 1]; ``info`` is the autoencoder's (``indices`` for VQ).
    """
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="reconstructing", disable=not progress):
        x = batch["image"].to(module.device)
        x_hat, _, info = module(x, sample_posterior=False)
        yield x, x_hat.clamp(-1, 1), info


@torch.no_grad()
def score_reconstructions(
    module: pl.LightningModule,
    datamodule: Any,
    metrics: GenerativeMetrics | MetricSuite,
    split: str,
    batch_size: int,
    limit: int | None = None,
    pixel_metrics: bool = False,
    lpips: nn.Module | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """``rfid`` (and KID/IS as ``metrics`` holds them) of the reconstructions of ``split``.

    With ``pixel_metrics`` also PSNR, SSIM, codebook usage of a VQ model and, given a network,
    LPIPS (see :class:`~ldm_lightning.metrics.reconstruction.ReconstructionMetrics`).
    """
    pixels = None
    if pixel_metrics:
        n_embed = module.quantize.n_embed if module.regularizer == "vq" else None
        pixels = ReconstructionMetrics(lpips=lpips, n_embed=n_embed)
    dataset = datamodule.build_split(split, augment=False)
    for x, x_hat, info in reconstructions(module, dataset, batch_size, limit, progress):
        if pixels is not None:
            pixels.update(x, x_hat, info.get("indices"))
        metrics.update(x_hat)
    results = metrics.compute()
    results = {"rfid": results.pop("fid"), **results}
    return {**results, **(pixels.compute() if pixels is not None else {})}


def format_table(metrics: dict[str, Any]) -> str:
    """Metric names and values as an aligned two-column text table."""
    width = max(map(len, metrics))
    rows = [
        f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}"
        for name, value in metrics.items()
    ]
    rule = "-" * max(map(len, rows))
    return "\n".join([rule, *rows, rule])
