"""PatchGAN discriminator (pix2pix, Isola et al. 2017, sec. 3.2.2), as used by taming / LDM.

Each output logit scores one overlapping patch of the input as real or fake. The layer layout
and the ``main.{i}`` parameter names match taming-transformers' ``NLayerDiscriminator``, so
CompVis checkpoints (``loss.discriminator.main.*``) load unchanged.
"""

from torch import Tensor, nn


def weights_init(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al. 2016, sec. 4): conv weights ~ N(0, 0.02),
    BatchNorm scale ~ N(1, 0.02) and shift 0. Use with ``module.apply(weights_init)``."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: ``[B, in_channels, H, W] -> [B, 1, H', W']`` patch logits.

    Layers (all 4x4 convs, padding 1, LeakyReLU slope 0.2)::

        conv s2 (ndf)                                   no norm
        n_layers - 1 times: conv s2 (ndf * min(2**n, 8)) + BatchNorm
        conv s1 (ndf * min(2**n_layers, 8)) + BatchNorm
        conv s1 (1)                                     logits

    Convs followed by BatchNorm carry no bias. For even sizes ``H' = H / 2**n_layers - 2``
    (e.g. 32 px, 3 layers: 2x2 patches of 70x70 px receptive field each).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}; pix2pix and LDM use 3")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(
                    ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=False
                ),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
