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
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_lightning.nn.attention import (
    AttentionBlock,
    SpatialTransformer,
    maybe_checkpoint,
    normalization,
    zero_module,
)
from ldm_lightning.nn.backbone import check_inputs
from ldm_lightning.nn.embeddings import timestep_embedding

CHANNEL_MULT = (1, 2, 4, 8)  # UNetModel's default levels


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, followed by a 3x3 conv when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, 2H, 2W]."""
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv when ``use_conv``, else by 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = (
            nn.Conv2d(channels, channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(kernel_size=2, stride=2)
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H/2, W/2]."""
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding.

    ``h = conv(SiLU(norm(x)))``, then the embedding enters either additively (DDPM:
    ``h + W e``) or, with ``use_scale_shift_norm``, as adaptive group norm (ADM sec. 3:
    ``norm(h) * (1 + s) + b`` with ``[s, b] = W e``); the output is
    ``skip(x) + conv_0(dropout(SiLU(...)))`` with ``conv_0`` zero-initialised, so the block
    starts as its skip connection. ``up``/``down`` resample inside the block (BigGAN style).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``x`` [B, C, H, W], ``emb`` [B, emb_channels] -> [B, out_channels, H', W']."""
        return maybe_checkpoint(
            self._forward, x, emb, enabled=self.use_checkpoint and self.training
        )

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the time embedding to ResBlocks and the context to transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` [B, C, H, W], ``emb`` [B, E], ``context`` [B, L, D] or None -> [B, C', H', W']."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
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
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(
                f"set exactly one of num_heads ({num_heads}) and num_head_channels "
                f"({num_head_channels}); leave the other at -1"
            )
        if use_spatial_transformer is None:
            use_spatial_transformer = context_dim is not None
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError(
                f"context_dim={context_dim} needs cross-attention: set "
                "use_spatial_transformer=True (or leave it None)"
            )
        if not channel_mult:
            raise ValueError("channel_mult must list at least one level, e.g. (1, 2, 4)")
        level_ds = [2**level for level in range(len(channel_mult))]
        unused = sorted(set(attention_resolutions) - set(level_ds))
        if unused:
            raise ValueError(
                f"attention_resolutions {list(attention_resolutions)} has factors {unused} that "
                f"no level reaches; with channel_mult {tuple(channel_mult)} the levels have "
                f"downsampling factors {level_ds}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.downsample_factor = level_ds[-1]
        time_embed_dim = model_channels * 4

        def res_block(ch: int, out_ch: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch,
                time_embed_dim,
                dropout,
                out_channels=out_ch,
                use_scale_shift_norm=use_scale_shift_norm,
                use_checkpoint=use_checkpoint,
                up=up,
                down=down,
            )

        def attention(ch: int) -> nn.Module:
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            if heads < 1 or ch % heads:
                raise ValueError(
                    f"{ch} channels cannot be split into heads (num_heads={num_heads}, "
                    f"num_head_channels={num_head_channels})"
                )
            if use_spatial_transformer:
                return SpatialTransformer(
                    ch,
                    heads,
                    ch // heads,
                    depth=transformer_depth,
                    context_dim=context_dim,
                    use_checkpoint=use_checkpoint,
                )
            return AttentionBlock(ch, num_heads=heads, use_checkpoint=use_checkpoint)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch = model_channels
        for level, (mult, ds) in enumerate(zip(channel_mult, level_ds, strict=True)):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention(ch), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, (mult, ds) in reversed(
            list(enumerate(zip(channel_mult, level_ds, strict=True)))
        ):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(
                        res_block(ch, ch, up=True)
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
        t_emb = timestep_embedding(timesteps, self.model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))
        if class_labels is not None:
            emb = emb + self.label_emb(class_labels)

        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def _check_inputs(
        self, x: Tensor, timesteps: Tensor, context: Tensor | None, class_labels: Tensor | None
    ) -> Tensor:
        """Raise a ValueError naming the mismatch; return timesteps broadcast to [B]."""
        timesteps = check_inputs(
            "UNet", x, timesteps, context, class_labels, in_channels=self.in_channels,
            context_dim=self.context_dim, num_classes=self.num_classes,
        )
        h, w = x.shape[-2:]
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(
                f"input size {h}x{w} is not divisible by {f} = 2 ** (len(channel_mult) - 1); "
                f"crop or pad to a multiple of {f}, or use fewer levels"
            )
        return timesteps
