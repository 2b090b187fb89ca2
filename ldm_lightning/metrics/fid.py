"""FID, KID, IS and precision/recall of generated images against cached real-image features.

FID (Heusel et al. 2017, eq. 6) fits Gaussians to feature vectors of real and generated images:
``FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})``. KID (Binkowski et al. 2018) is
the unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets. IS (Salimans
et al. 2016) is ``exp E_x KL(p(y|x) || p(y))`` over class logits. Precision and recall:
:mod:`ldm_lightning.metrics.precision_recall`.

Features are extracted once per image by one network (the default: Inception-v3 with the
TensorFlow FID weights from torch-fidelity, which torchmetrics uses by default and the LDM
paper's numbers were computed with); FID, KID and IS are torchmetrics' own, precision and
recall torch-fidelity's, fed those features. Real-image features are cached on disk, keyed on
the dataset, its pixel settings, the split, the number of images and the extractor's weights,
and written atomically.

Extractor contract: ``extractor(images [B, 3, H, W] float in [0, 1])`` returns
``features [B, D]`` or ``(features [B, D], logits [B, K])``; IS uses the logits when given,
else the features. Any small ``nn.Module`` serves for offline tests.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.image import (
    FrechetInceptionDistance,
    InceptionScore,
    KernelInceptionDistance,
)
from tqdm import tqdm

from ldm_lightning.metrics.dinov2 import DinoV2Features
from ldm_lightning.metrics.precision_recall import precision_recall
from ldm_lightning.metrics.resize import Resized
from ldm_lightning.utils.atomic import atomic_torch_save
from ldm_lightning.utils.hashing import state_dict_sha256, text_sha256

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
# Chong & Forsyth 2020: FID_N = FID_inf + k / N, so FIDs from fewer samples are biased upwards.
UNBIASED_SAMPLES = 10_000
FORMAT_VERSION = 1
# Datamodule attributes that say where latents are cached, not what the pixels are.
_NOT_PIXELS = ("cache_latents", "cache_dir")


def inception_weights_path() -> Path:
    """Where torch-fidelity (and so torchmetrics) looks for the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


class InceptionFeatures(nn.Module):
    """Inception-v3 with the TF FID weights: ``[B, 3, H, W]`` in [0, 1] -> (pool3, logits).

    Returns ``features [B, 2048]`` (pool3, for FID/KID) and ``logits [B, 1008]`` (unbiased
    logits, for IS) from one forward pass. Images are quantised to uint8 as torchmetrics does
    with ``normalize=True`` and resized to 299 px with TF1-compatible bilinear interpolation
    (torch-fidelity's protocol).
    """

    num_features = 2048
    resize = "tf1_bilinear"  # torch-fidelity's, inside the network: the LDM paper's FIDs

    def __init__(self) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights_path()
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=str(path) if path.is_file() else None,
            )
        except Exception as error:  # download (URLError, HTTPError) or unreadable file
            raise RuntimeError(
                f"the Inception-v3 FID weights could not be loaded ({type(error).__name__}: "
                f"{error}). Download {INCEPTION_WEIGHTS_URL} on a machine with network access "
                f"and place the file {INCEPTION_WEIGHTS_FILE} at {path} (the torch hub cache; "
                "move it with $TORCH_HOME). For offline tests, set feature_extractor to the "
                "_target_ of a small nn.Module instead."
            ) from error
        self.identity = f"inception-v3-compat:{INCEPTION_WEIGHTS_FILE}"

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features, logits = self.net((images.clamp(0, 1) * 255).byte())
        return features, logits


def build_feature_extractor(
    spec: str | Mapping[str, Any] | nn.Module, resize: str = "bicubic"
) -> nn.Module:
    """``"inception"``, ``"dinov2"``, the dotted path of an ``nn.Module`` class, a ``_target_``
    dict or a module.

    A module that declares an ``input_size`` (DINOv2, 224) is fed images resized to it with the
    ``resize`` filter (:class:`~ldm_lightning.metrics.resize.Resized`). The result is frozen and
    in eval mode.
    """
    if isinstance(spec, nn.Module):
        module = spec
    elif spec == "inception":
        module = InceptionFeatures()
    elif spec == "dinov2":
        module = DinoV2Features()
    elif isinstance(spec, Mapping) and "_target_" in spec:
        module = hydra.utils.instantiate(spec)
    elif isinstance(spec, str) and "." in spec:
        module = hydra.utils.get_class(spec)()
    else:
        raise ValueError(
            f"feature extractor {spec!r} is not understood; use 'inception', 'dinov2' or the "
            "_target_ of an nn.Module that maps images [B, 3, H, W] in [0, 1] to features [B, D]."
        )
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"feature extractor {spec!r} built a {type(module).__name__}, not a Module"
        )
    if getattr(module, "input_size", None) is not None and not isinstance(module, Resized):
        module = Resized(module, resize)
    return module.eval().requires_grad_(False)


def extractor_identity(extractor: nn.Module) -> str:
    """A string that changes whenever the extractor's class, weights or resize filter change."""
    if isinstance(extractor, Resized):
        return f"{extractor_identity(extractor.net)}@{extractor.input_size}px-{extractor.resize}"
    identity = getattr(extractor, "identity", None)
    if identity:
        return str(identity)
    cls = type(extractor)
    return f"{cls.__module__}.{cls.__qualname__}:{state_dict_sha256(extractor)[:16]}"


@torch.no_grad()
def extract(extractor: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``images [B, 3, H, W]`` in [-1, 1] -> ``(features [B, D], logits [B, K])`` on the CPU."""
    device = next(extractor.parameters(), torch.empty(0)).device
    output = extractor(((images.float() + 1) / 2).clamp(0, 1).to(device))
    features, logits = output if isinstance(output, (tuple, list)) else (output, output)
    if features.ndim != 2 or features.shape[0] != images.shape[0]:
        raise ValueError(
            f"the feature extractor returned features of shape {tuple(features.shape)} for "
            f"{images.shape[0]} images; it must return [B, D]."
        )
    return features.cpu(), logits.cpu()


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` of ``features [N, D]`` (float64)."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance of two Gaussians (Dowson & Landau 1982; FID, Heusel et al. 2017 eq. 6).

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))``, with the matrix square root by
    ``scipy.linalg.sqrtm``: the reference the torchmetrics computation is tested against.
    """
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def sample_size_warning(num_samples: int) -> str | None:
    """The published-protocol caveat for FIDs from fewer than 10k samples, or None."""
    if num_samples >= UNBIASED_SAMPLES:
        return None
    return (
        f"FID from {num_samples} samples is biased upwards: FID_N is linear in 1/N "
        f"(Chong & Forsyth 2020); compare FIDs only at equal N, and report N >= "
        f"{UNBIASED_SAMPLES} (50k in LDM) for published numbers."
    )


# ---------------------------------------------------------------------- real-feature cache
@dataclass(frozen=True)
class RealFeaturesKey:
    """Everything the real features depend on; its digest names the cache file."""

    dataset: str
    split: str
    transforms: dict[str, Any] = field(default_factory=dict)
    extractor: str = ""
    num_images: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), sort_keys=True, default=str))

    def filename(self) -> str:
        digest = text_sha256(json.dumps(self.to_dict(), sort_keys=True))
        size = self.transforms.get("image_size", "x")
        return f"{self.dataset}-{self.split}-{size}px-{digest[:16]}.pt"


def real_features_key(
    datamodule: Any, split: str, extractor: nn.Module, num_images: int | None = None
) -> RealFeaturesKey:
    """The cache key of ``split`` of ``datamodule`` (name + ``transform_signature()``)."""
    transforms = {k: v for k, v in datamodule.transform_signature().items() if k not in _NOT_PIXELS}
    return RealFeaturesKey(
        dataset=datamodule.name,
        split=split,
        transforms=transforms,
        extractor=extractor_identity(extractor),
        num_images=num_images,
    )


def _load_cached(path: Path, key: RealFeaturesKey) -> Tensor | None:
    """The cached features if the file is complete and was written for ``key``; else None."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: rebuild, never trust it
        log.warning("Ignoring unreadable real-feature cache %s (%s)", path, error)
        return None
    if (
        not isinstance(payload, dict)
        or payload.get("format_version") != FORMAT_VERSION
        or payload.get("key") != key.to_dict()
        or not isinstance(payload.get("features"), Tensor)
        or payload["features"].ndim != 2
    ):
        log.warning("Ignoring real-feature cache %s written for another key or format", path)
        return None
    return payload["features"]


def real_features(
    datamodule: Any,
    split: str,
    extractor: nn.Module,
    cache_dir: str | Path,
    num_images: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> Tensor:
    """Features ``[N, D]`` of the first ``num_images`` (all: None) un-augmented images of ``split``.

    Read from ``<cache_dir>/<dataset>-<split>-<res>px-<digest>.pt`` when a file for the same
    key exists, else extracted once and cached.
    """
    key = real_features_key(datamodule, split, extractor, num_images)
    path = Path(cache_dir) / key.filename()
    cached = _load_cached(path, key)
    if cached is not None:
        log.info("Real-image features from cache %s (%d images)", path, cached.shape[0])
        return cached
    dataset = datamodule.build_split(split, augment=False)
    if num_images is not None:
        if num_images > len(dataset):
            raise ValueError(
                f"num_real={num_images} real images requested, but the {split} split of "
                f"{datamodule.name} has {len(dataset)}; lower num_real or use null for all."
            )
        dataset = torch.utils.data.Subset(dataset, range(num_images))
    if len(dataset) < 2:
        raise ValueError(f"the {split} split of {datamodule.name} has fewer than 2 images")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks = [
        extract(extractor, batch["image"])[0]
        for batch in tqdm(loader, desc=f"real features ({split})", disable=not progress)
    ]
    features = torch.cat(chunks)
    atomic_torch_save(
        {"format_version": FORMAT_VERSION, "key": key.to_dict(), "features": features}, path
    )
    log.info("Cached real-image features of %d images at %s", features.shape[0], path)
    return features


# ---------------------------------------------------------------------- metrics
class _Precomputed(nn.Module):
    """Pass-through "extractor": the torchmetrics metrics receive features, not images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class GenerativeMetrics:
    """FID (always), KID, IS and precision/recall (on request) of generated images against
    real features.

    ``update(images)`` extracts features of generated images ``[B, 3, H, W]`` in [-1, 1];
    ``compute()`` returns ``{"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision",
    "recall", "num_generated", "num_real"}`` (the requested ones) as floats/ints. Precision and
    recall use the ``prc_neighborhood``-th nearest neighbour (k = 3 in Kynkäänniemi et al. 2019).
    KID's random subsets are drawn with ``seed``, so the same features give the same KID.
    """

    def __init__(
        self,
        extractor: nn.Module,
        real: Tensor,
        kid: bool = False,
        inception_score: bool = False,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
        precision_recall: bool = False,
        prc_neighborhood: int = 3,
        seed: int = 0,
    ) -> None:
        self.extractor = extractor
        self.num_real = real.shape[0]
        # k-NN radii need every feature, not only the Gaussian statistics.
        self.real = real if precision_recall else None
        self.generated: list[Tensor] = []
        self.prc_neighborhood = prc_neighborhood
        self.seed = seed
        self.kid_subset_size = kid_subset_size
        self.is_splits = is_splits
        passthrough = _Precomputed(real.shape[1])
        with warnings.catch_warnings():
            # KID and IS keep every feature in memory by design; their warning says only that.
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self._build(passthrough, kid, inception_score)
        for chunk in real.split(1024):
            self.fid.update(chunk, real=True)
            if self.kid is not None:
                self.kid.update(chunk, real=True)
        self.num_generated = 0

    def _build(self, passthrough: nn.Module, kid: bool, inception_score: bool) -> None:
        self.fid = FrechetInceptionDistance(feature=passthrough, reset_real_features=False)
        self.kid = (
            KernelInceptionDistance(feature=passthrough, subset_size=self.kid_subset_size)
            if kid
            else None
        )
        self.inception_score = (
            InceptionScore(feature=_Precomputed(0), splits=self.is_splits)
            if inception_score
            else None
        )

    def update(self, images: Tensor) -> None:
        features, logits = extract(self.extractor, images)
        self.fid.update(features, real=False)
        if self.kid is not None:
            self.kid.update(features, real=False)
        if self.inception_score is not None:
            self.inception_score.update(logits)
        if self.real is not None:
            self.generated.append(features)
        self.num_generated += images.shape[0]

    def compute(self) -> dict[str, float | int]:
        if self.num_generated < 2:
            raise ValueError(f"FID needs at least 2 generated images, got {self.num_generated}")
        results: dict[str, float | int] = {"fid": float(self.fid.compute())}
        if self.kid is not None:
            # torchmetrics' KID draws subsets of subset_size from both sets; smaller sets than
            # that use the largest subset both can give.
            self.kid.subset_size = min(self.kid_subset_size, self.num_real, self.num_generated)
            with torch.random.fork_rng(devices=[]):  # torchmetrics draws from the global RNG
                torch.manual_seed(self.seed)
                kid_mean, kid_std = self.kid.compute()
            results.update(kid_mean=float(kid_mean), kid_std=float(kid_std))
        if self.inception_score is not None:
            if self.num_generated < self.is_splits:
                raise ValueError(
                    f"the Inception Score uses {self.is_splits} splits but only "
                    f"{self.num_generated} images were generated; generate more."
                )
            is_mean, is_std = self.inception_score.compute()
            results.update(is_mean=float(is_mean), is_std=float(is_std))
        if self.real is not None:
            generated = torch.cat(self.generated)
            results.update(precision_recall(generated, self.real, self.prc_neighborhood))
        results.update(num_generated=self.num_generated, num_real=self.num_real)
        return results
