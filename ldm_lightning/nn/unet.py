"""Time-conditional UNet ``eps_theta(z_t, t, tau(y))`` of the latent diffusion stage.

The architecture of DDPM (Ho et al. 2020, App. B) with the improvements of ADM (Dhariwal &
Nichol 2021: scale-shift norm, multi-head attention at several resolutions, residual
up/downsampling) and LDM's cross-attention conditioning (Rombach et al. 2022, sec. 3.3).
Module and parameter names follow CompVis ``openaimodel.UNetModel`` so its checkpoints load by
name (``model.diffusion_model.`` prefix stripped).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldm_lightning.nn.attention import normalization, zero_module
from ldm_lightning.nn.unet_blocks import (
    DownPath,
    TimestepEmbedSequential,
    UNetBlocks,
    Upsample,
    downsampling_factors,
)

CHANNEL_MULT = (1, 2, 4, 8)  # UNetModel's default levels


class UNetModel(DownPath):
    """Noise-prediction UNet ``eps_theta(x_t, t, c, y)`` (LDM eq. 2 and 3).

    Each of the ``len(channel_mult)`` levels has ``num_res_blocks`` ResBlocks of width
    ``model_channels * mult``, followed by attention where the downsampling factor ``ds``
    (1, 2, 4, ...) is in ``attention_resolutions``; levels are joined by 2x down/upsampling and
    the decoder concatenates the encoder activations (skip connections). The middle block is
    ResBlock, attention, ResBlock. The timestep enters every ResBlock through
    ``time_embed(timestep_embedding(t))`` (plus ``label_emb(y)`` when class-conditional).

    Attention is a ``SpatialTransformer`` (self- and cross-attention to ``context``) when
    ``use_spatial_transformer`` (default: iff ``context_dim`` is set), otherwise the pixel
    self-attention ``AttentionBlock``. Dropout applies inside ResBlocks only, as in CompVis.

    Args:
        in_channels, out_channels: channels of ``x_t`` and of the prediction.
        model_channels: base width; the time embedding has ``4 * model_channels``.
        num_res_blocks: ResBlocks per level in the encoder (the decoder has one more).
        attention_resolutions: downsampling factors that get attention, e.g. ``[4, 2, 1]``.
        channel_mult: width multiplier per level.
        num_heads, num_head_channels: set exactly one: a fixed number of heads, or a fixed
            width per head (heads = channels // num_head_channels).
        context_dim: width ``D`` of the context tokens ``[B, L, D]``; None: no cross-attention.
        transformer_depth: transformer blocks per SpatialTransformer.
        num_classes: class-conditional with this many labels (the caller may reserve the last
            index as the null class for classifier-free guidance).
        use_scale_shift_norm: adaptive group norm (ADM) instead of an additive embedding.
        resblock_updown: resample with ResBlocks instead of (conv) Down/Upsample.
        conv_resample: learned 3x3 conv in Down/Upsample (else average pooling / plain nearest).
        use_checkpoint: gradient checkpointing in ResBlocks and attention during training.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        channel_mult: Sequence[int] = CHANNEL_MULT,
        dropout: float = 0.0,
        num_heads: int = -1,
        num_head_channels: int = -1,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        use_spatial_transformer: bool | None = None,
        num_classes: int | None = None,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if use_spatial_transformer is None:
            use_spatial_transformer = context_dim is not None
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError(
                f"context_dim={context_dim} needs cross-attention: set "
                "use_spatial_transformer=True (or leave it None)"
            )
        blocks = UNetBlocks(
            model_channels * 4, dropout, num_heads, num_head_channels, use_spatial_transformer,
            context_dim, transformer_depth, use_scale_shift_norm, use_checkpoint,
        )
        level_ds = downsampling_factors(channel_mult, attention_resolutions)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.downsample_factor = level_ds[-1]

        self.time_embed = blocks.time_embed(model_channels)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, blocks.time_embed_dim)
        self.input_blocks, skip_channels, ch = blocks.down_path(
            in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
            resblock_updown, conv_resample,
        )
        self.middle_block = blocks.middle(ch)

        self.output_blocks = nn.ModuleList()
        for level, (mult, ds) in reversed(
            list(enumerate(zip(channel_mult, level_ds, strict=True)))
        ):
            for i in range(num_res_blocks + 1):
                layers = [blocks.res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(blocks.attention(ch))
                if level and i == num_res_blocks:
                    layers.append(
                        blocks.res_block(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample)
                    )
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )

    @classmethod
    def input_multiple(cls, settings: Mapping[str, Any]) -> tuple[int, str]:
        """Inputs must divide by the downsampling ``2 ** (len(channel_mult) - 1)`` of the
        levels ``settings["channel_mult"]`` (the :mod:`~ldm_lightning.nn.backbone` protocol)."""
        channel_mult = list(settings.get("channel_mult", CHANNEL_MULT) or (1,))
        factor = 2 ** (len(channel_mult) - 1)
        return factor, (
            f"the UNet's downsampling {factor} (channel_mult={channel_mult}); use fewer UNet "
            "levels or larger images"
        )

    def compile_regions(self) -> list[nn.Module]:
        """The down path's regions (:meth:`DownPath.compile_regions`), every output block and
        the output layer."""
        return [*super().compile_regions(), *self.output_blocks, self.out]

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """Predict from ``x`` [B, in_channels, H, W] at ``timesteps`` [B] (long or float).

        ``context`` [B, L, context_dim] is required iff ``context_dim`` was set (pass the
        conditioner's null context for unconditional samples); ``class_labels`` [B] long is
        required iff ``num_classes`` was set. H and W must be divisible by
        ``2 ** (len(channel_mult) - 1)``. Returns [B, out_channels, H, W].
        """
        timesteps = self._check_inputs(x, timesteps, context, class_labels)
        emb = self.embed_time(timesteps)
        if class_labels is not None:
            emb = emb + self.label_emb(class_labels)
        h, skips = self.down(x, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
