"""DINOv2 features for FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model
evaluation metrics", sec. 4): the Fréchet distance of FID, on DINOv2 ViT-L/14 CLS features.

Stein et al. find Inception features rank generated images unlike humans do, and DINOv2-ViT-L/14
features rank them like humans; FD-DINOv2 is ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r
S_g)^{1/2})`` on those 1024-D features, computed by the same code as FID. Images reach the
network at 224 px (resized by the protocol's filter, bicubic in Stein et al.; see
:mod:`ldm_lightning.metrics.resize`) and normalised with the ImageNet mean and std.

The network is torch hub's ``facebookresearch/dinov2`` (code and weights), read from the torch
hub cache only: nothing is downloaded here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["DINOV2_ARCH", "DinoV2Features", "dinov2_files"]

DINOV2_ARCH = "dinov2_vitl14"  # Stein et al. 2023's choice
HUB_REPO = "facebookresearch/dinov2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dinov2_files(arch: str = DINOV2_ARCH) -> tuple[Path, Path]:
    """Where torch hub keeps the DINOv2 code (``<hub>/facebookresearch_dinov2_main``) and the
    weights of ``arch`` (``<hub>/checkpoints/<arch>_pretrain.pth``)."""
    hub = Path(torch.hub.get_dir())
    return hub / "facebookresearch_dinov2_main", hub / "checkpoints" / f"{arch}_pretrain.pth"


class DinoV2Features(nn.Module):
    """DINOv2 CLS features: ``images [B, 3, 224, 224]`` in [0, 1] -> ``features [B, D]``
    (D = 1024 for ViT-L/14). Wrap it in :class:`~ldm_lightning.metrics.resize.Resized`."""

    input_size = 224

    def __init__(self, arch: str = DINOV2_ARCH) -> None:
        super().__init__()
        code, weights = dinov2_files(arch)
        missing = [str(path) for path in (code / "hubconf.py", weights) if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"FD-DINOv2 reads DINOv2 ({arch}) from the torch hub cache, but "
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. On a "
                f"machine with network access run python -c \"import torch; "
                f"torch.hub.load('{HUB_REPO}', '{arch}')\" and copy its hub folder to "
                f"{code.parent} (or point $TORCH_HOME at a copy); or drop fd_dinov2 from "
                "protocol.metrics."
            )
        self.net = torch.hub.load(str(code), arch, source="local")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.identity = f"{HUB_REPO}:{weights.name}"

    def forward(self, images: Tensor) -> Tensor:
        return self.net((images - self.mean) / self.std)
