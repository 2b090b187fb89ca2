"""LPIPS perceptual distance (Zhang et al. 2018) for the autoencoder loss (LDM sec. 3.1).

The ``lpips`` package ships the calibrated linear heads; the backbone's ImageNet weights come
from torchvision, which downloads them once into the torch hub cache. This module turns a
failed download into an error that says which file to fetch and where to put it.
"""

import warnings
from pathlib import Path

import lpips
import torch
from torch import nn
from torchvision import models

# torchvision weights that lpips' backbones load (lpips calls e.g. ``vgg16(pretrained=True)``).
_BACKBONE_WEIGHTS = {
    "vgg": models.VGG16_Weights.IMAGENET1K_V1,
    "alex": models.AlexNet_Weights.IMAGENET1K_V1,
    "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
}


def build_lpips(net: str = "vgg", pretrained_backbone: bool = True) -> nn.Module:
    """Frozen LPIPS network: ``f(x, y) -> [B, 1, 1, 1]`` distances for images in ``[-1, 1]``.

    Args:
        net: backbone, one of ``"vgg"`` (used by LDM and taming), ``"alex"``, ``"squeeze"``.
        pretrained_backbone: load the backbone's ImageNet weights (downloaded once into
            ``torch.hub.get_dir()/checkpoints``). ``False`` keeps a random backbone: offline and
            fast, for tests only, since its distances are not perceptual.

    Returns:
        ``lpips.LPIPS`` in eval mode with every parameter frozen (gradients still flow to its
        inputs).

    Raises:
        RuntimeError: the backbone weights are not cached and cannot be downloaded; the message
            names the file and the folder to put it in.
    """
    if net not in _BACKBONE_WEIGHTS:
        raise ValueError(
            f"unknown LPIPS backbone {net!r}; choose one of {sorted(_BACKBONE_WEIGHTS)}"
        )
    try:
        with warnings.catch_warnings():
            # lpips still passes torchvision's deprecated `pretrained=` flag; nothing to act on.
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            model = lpips.LPIPS(
                net=net, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False
            )
    except OSError as err:
        url = _BACKBONE_WEIGHTS[net].url
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"LPIPS needs the ImageNet weights of its {net!r} backbone and downloading them "
            f"failed ({err}). Fetch {url} on a machine with network access and copy the file "
            f"{url.rsplit('/', 1)[-1]} into {folder} (the torch hub cache; move it with "
            "$TORCH_HOME). For offline tests only, pass pretrained_backbone=false to use a "
            "random backbone."
        ) from err
    model.eval()
    model.requires_grad_(False)
    return model
