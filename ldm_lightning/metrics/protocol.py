"""The evaluation protocol: what every number of ``evaluate`` depends on, fixed and recorded.

FIDs stop being comparable when the sample count, the real images, the resize filter or the
seeds differ (Chong & Forsyth 2020; Parmar et al. 2022). :class:`Protocol` holds them
(``protocol:`` in ``conf/evaluate.yaml``): ``num_samples`` generated images, batch ``b`` with seed
``seed + b``, against the first ``num_real`` images of ``split``, images brought to an extractor's
input size with ``resize``, and which ``metrics``. :meth:`Protocol.record` is written into
``metrics.json`` and :meth:`Protocol.describe` printed with the numbers, with a digest that is
equal exactly when two protocols are.

:class:`MetricSuite` feeds one stream of images to the feature metrics of the protocol: FID, KID,
IS, precision/recall on the main extractor (Inception) and FD-DINOv2 (Stein et al. 2023), the
same Fréchet distance on DINOv2 features.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm_lightning.metrics.fid import (
    GenerativeMetrics,
    build_feature_extractor,
    extractor_identity,
    real_features,
)
from ldm_lightning.metrics.resize import FILTERS
from ldm_lightning.utils.hashing import text_sha256

__all__ = ["METRICS", "MetricSuite", "Protocol", "check_text_model"]

# fid is always computed; the others on request.
METRICS = ("fid", "kid", "is", "precision_recall", "fd_dinov2", "clip_score")


@dataclass(frozen=True)
class Protocol:
    """The settings every number depends on besides the checkpoint and the sampler."""

    num_samples: int
    split: str
    num_real: int | None
    seed: int
    batch_size: int  # batch b has seed + b, so the batch size decides each sample's seed
    resize: str
    metrics: tuple[str, ...]
    kid_subset_size: int
    is_splits: int
    prc_neighborhood: int

    @classmethod
    def from_config(
        cls, protocol: Mapping[str, Any], batch_size: int, default_split: str
    ) -> Protocol:
        """Checked: known metrics and filter, positive counts; ``split: null`` is
        ``default_split``."""
        metrics = tuple(dict.fromkeys(["fid", *protocol["metrics"]]))
        unknown = sorted(set(metrics) - set(METRICS))
        if unknown:
            raise ValueError(
                f"protocol.metrics={list(protocol['metrics'])} has unknown {unknown}; choose "
                f"from {list(METRICS)}"
            )
        if protocol["resize"] not in FILTERS:
            raise ValueError(
                f"protocol.resize={protocol['resize']!r} is unknown; choose one of {list(FILTERS)}"
            )
        for key in ("num_samples", "prc_neighborhood", "kid_subset_size", "is_splits"):
            if protocol[key] < 1:
                raise ValueError(f"protocol.{key}={protocol[key]} must be at least 1")
        return cls(
            num_samples=int(protocol["num_samples"]),
            split=protocol["split"] or default_split,
            num_real=protocol["num_real"],
            seed=int(protocol["seed"]),
            batch_size=int(batch_size),
            resize=str(protocol["resize"]),
            metrics=metrics,
            kid_subset_size=int(protocol["kid_subset_size"]),
            is_splits=int(protocol["is_splits"]),
            prc_neighborhood=int(protocol["prc_neighborhood"]),
        )

    def digest(self) -> str:
        return text_sha256(json.dumps(asdict(self), sort_keys=True))[:12]

    def record(self, extractors: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
        """The protocol as ``metrics.json`` holds it, with the network behind each metric and
        the filter that resized its input (``extractors``: metric -> ``{"network", "resize"}``).
        """
        return {**asdict(self), "metrics": list(self.metrics),
                "extractors": {name: dict(value) for name, value in extractors.items()},
                "digest": self.digest()}

    def build_metrics(
        self,
        datamodule: Any,
        extractor: Any,
        dinov2_extractor: Any,
        stats_dir: str | Path,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        progress: bool = False,
    ) -> tuple[MetricSuite, dict[str, dict[str, str]]]:
        """The protocol's feature metrics, with their real features (cached in ``stats_dir``),
        and the network behind each metric (``{"network": identity, "resize": filter}``).
        ``extractor`` and ``dinov2_extractor``:
        :func:`~ldm_lightning.metrics.fid.build_feature_extractor` specs (the second only read
        for ``fd_dinov2``)."""

        def part(spec: Any, **requested: bool) -> tuple[GenerativeMetrics, dict[str, str]]:
            network = build_feature_extractor(spec, self.resize).to(device)
            real = real_features(datamodule, self.split, network, stats_dir, self.num_real,
                                 batch_size, progress)
            metrics = GenerativeMetrics(
                network, real, kid_subset_size=self.kid_subset_size, is_splits=self.is_splits,
                prc_neighborhood=self.prc_neighborhood, seed=self.seed, **requested,
            )
            # A network that takes any size (an offline stand-in) is fed the images as they are.
            resize = getattr(network, "resize", "none")
            return metrics, {"network": extractor_identity(network), "resize": resize}

        main, identity = part(extractor, kid="kid" in self.metrics,
                              inception_score="is" in self.metrics,
                              precision_recall="precision_recall" in self.metrics)
        identities, others = {"fid": identity}, {}
        if "fd_dinov2" in self.metrics:
            others["fd_dinov2"], identities["fd_dinov2"] = part(dinov2_extractor)
        return MetricSuite(main, others), identities

    def describe(self) -> str:
        """One line: the protocol's digest and settings."""
        real = "all" if self.num_real is None else self.num_real
        return (
            f"protocol {self.digest()}: {self.num_samples} samples (batch b of {self.batch_size}: "
            f"seed {self.seed} + b) vs {real} real images of the {self.split} split, resize "
            f"{self.resize}, metrics {', '.join(self.metrics)}"
        )


class MetricSuite:
    """The feature metrics of a protocol over one stream of images.

    ``update(images [B, 3, H, W] in [-1, 1])`` feeds every part; ``compute()`` returns the main
    part's results (``fid``, ``kid_*``, ``is_*``, ``precision``, ``recall``) and, for each
    other part, its Fréchet distance under the part's name (``fd_dinov2``).
    """

    def __init__(self, main: GenerativeMetrics, others: Mapping[str, GenerativeMetrics]) -> None:
        self.main = main
        self.others = dict(others)

    def update(self, images: Tensor) -> None:
        self.main.update(images)
        for part in self.others.values():
            part.update(images)

    def compute(self) -> dict[str, float | int]:
        results = self.main.compute()
        distances = {name: part.compute()["fid"] for name, part in self.others.items()}
        counts = {key: results.pop(key) for key in ("num_generated", "num_real")}
        return {**results, **distances, **counts}


def check_text_model(module: Any, metrics: Sequence[str]) -> None:
    """``clip_score`` scores images against the captions they were drawn with: it needs a
    text-conditional latent diffusion model."""
    if "clip_score" not in metrics:
        return
    conditioner = getattr(module, "conditioner", None)
    if getattr(conditioner, "inputs", None) != "prompts":
        condition = getattr(conditioner, "condition", None) if conditioner is not None else None
        what = f"{condition}-conditional" if condition else "not text-conditional"
        raise ValueError(
            f"protocol.metrics has clip_score, which scores samples against their captions, but "
            f"this checkpoint is {what}; drop clip_score from protocol.metrics."
        )
