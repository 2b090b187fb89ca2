"""The noisy classifier ``p_phi(y | x_t, t)`` of classifier guidance: the UNet's encoder half.

ADM's ``EncoderUNetModel`` (Dhariwal & Nichol 2021, "Diffusion models beat GANs on image
synthesis", sec. 4: the downsampling trunk of the UNet with a pooled head; the paper pools with
attention), here with the reference code's ``pool="adaptive"`` head: the UNet's
down path and middle block (:class:`~ldm_lightning.nn.unet_blocks.DownPath`, built by the same
:class:`~ldm_lightning.nn.unet_blocks.UNetBlocks` as the UNet's), then GroupNorm, SiLU, global
average pooling and a zero-initialised linear layer to the class logits, so an untrained
classifier is uniform and guides nowhere.
"""

from collections.abc import Sequence

from torch import Tensor, nn

from ldm_lightning.nn.attention import normalization, zero_module
from ldm_lightning.nn.unet_blocks import DownPath, UNetBlocks, downsampling_factors


class EncoderUNetModel(DownPath):
    """Class logits ``[B, out_channels]`` of a noisy input ``x`` ``[B, in_channels, H, W]`` at
    ``timesteps`` ``[B]``, called like the UNet (``model(x, t)``).

    Args: those of :class:`~ldm_lightning.nn.unet.UNetModel` that shape its down path and
    middle block (no conditioning: no context, no class labels); ``out_channels`` is the number
    of classes.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        dropout: float = 0.0,
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        blocks = UNetBlocks(
            model_channels * 4, dropout, num_heads, num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm, use_checkpoint=use_checkpoint,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.downsample_factor = downsampling_factors(channel_mult, attention_resolutions)[-1]
        self.time_embed = blocks.time_embed(model_channels)
        self.input_blocks, _, ch = blocks.down_path(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
            resblock_updown, conv_resample,
        )
        self.middle_block = blocks.middle(ch)
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            zero_module(nn.Linear(ch, out_channels)),
        )

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """Logits ``[B, out_channels]`` of ``x`` ``[B, in_channels, H, W]`` (H, W divisible by
        ``2 ** (len(channel_mult) - 1)``) at ``timesteps`` ``[B]`` (long or float, or a
        scalar)."""
        timesteps = self._check_inputs(x, timesteps)
        h, _ = self.down(x, self.embed_time(timesteps))
        return self.out(h)
