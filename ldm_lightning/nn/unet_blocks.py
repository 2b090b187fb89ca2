"""The blocks of the time-conditional UNet and of its encoder half (the noisy classifier).

ResBlocks conditioned on the timestep embedding, up/downsampling, the sequential container that
routes the embedding and the context, :class:`UNetBlocks` (one UNet's block factory: the time
MLP, the down path, the middle block) and :class:`DownPath`, the part of the network that
:class:`~ldm_lightning.nn.unet.UNetModel` and
:class:`~ldm_lightning.nn.classifier.EncoderUNetModel` share. Names follow CompVis
``openaimodel``.
"""

from collections.abc import Sequence

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


class UNetBlocks:
    """The blocks of one UNet (and of its encoder half), from its settings: ResBlocks on its time
    embedding, its attention layers, the time-embedding MLP, the down path and the middle block.

    Args: those of :class:`UNetModel` that shape its blocks; ``time_embed_dim`` is
    ``4 * model_channels``.
    """

    def __init__(
        self,
        time_embed_dim: int,
        dropout: float = 0.0,
        num_heads: int = -1,
        num_head_channels: int = -1,
        use_spatial_transformer: bool = False,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        use_scale_shift_norm: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        if (num_heads == -1) == (num_head_channels == -1):
            raise ValueError(
                f"set exactly one of num_heads ({num_heads}) and num_head_channels "
                f"({num_head_channels}); leave the other at -1"
            )
        self.time_embed_dim = time_embed_dim
        self.dropout = dropout
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.use_spatial_transformer = use_spatial_transformer
        self.context_dim = context_dim
        self.transformer_depth = transformer_depth
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

    def time_embed(self, model_channels: int) -> nn.Sequential:
        """The MLP of the sinusoidal timestep embedding: ``[B, model_channels] -> [B, E]``."""
        return nn.Sequential(
            nn.Linear(model_channels, self.time_embed_dim),
            nn.SiLU(),
            nn.Linear(self.time_embed_dim, self.time_embed_dim),
        )

    def res_block(self, ch: int, out_ch: int, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(
            ch,
            self.time_embed_dim,
            self.dropout,
            out_channels=out_ch,
            use_scale_shift_norm=self.use_scale_shift_norm,
            use_checkpoint=self.use_checkpoint,
            up=up,
            down=down,
        )

    def attention(self, ch: int) -> nn.Module:
        heads = self.num_heads if self.num_head_channels == -1 else ch // self.num_head_channels
        if heads < 1 or ch % heads:
            raise ValueError(
                f"{ch} channels cannot be split into heads (num_heads={self.num_heads}, "
                f"num_head_channels={self.num_head_channels})"
            )
        if self.use_spatial_transformer:
            return SpatialTransformer(
                ch,
                heads,
                ch // heads,
                depth=self.transformer_depth,
                context_dim=self.context_dim,
                use_checkpoint=self.use_checkpoint,
            )
        return AttentionBlock(ch, num_heads=heads, use_checkpoint=self.use_checkpoint)

    def down_path(
        self,
        in_channels: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        resblock_updown: bool = False,
        conv_resample: bool = True,
    ) -> tuple[nn.ModuleList, list[int], int]:
        """The encoder's ``input_blocks``: a conv in, then per level ``num_res_blocks``
        ResBlocks (with attention where the level's factor is in ``attention_resolutions``) and
        a 2x downsampling between levels. Returns the blocks, the channels of each block's
        output (the decoder's skip connections) and the channels at the bottom."""
        level_ds = downsampling_factors(channel_mult, attention_resolutions)
        blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch = model_channels
        for level, (mult, ds) in enumerate(zip(channel_mult, level_ds, strict=True)):
            for _ in range(num_res_blocks):
                layers = [self.res_block(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(self.attention(ch))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    self.res_block(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample)
                )
                blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
        return blocks, skip_channels, ch

    def middle(self, ch: int) -> TimestepEmbedSequential:
        """The middle block: ResBlock, attention, ResBlock."""
        return TimestepEmbedSequential(
            self.res_block(ch, ch), self.attention(ch), self.res_block(ch, ch)
        )


def downsampling_factors(
    channel_mult: Sequence[int], attention_resolutions: Sequence[int]
) -> list[int]:
    """The downsampling factor of each level (1, 2, 4, ...), or a ValueError for no levels or
    an attention factor no level reaches."""
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
    return level_ds


class DownPath(nn.Module):
    """What :class:`UNetModel` and its encoder half share: the time embedding (``time_embed``),
    the down path (``input_blocks``) and the middle block (``middle_block``), which a subclass
    builds with :class:`UNetBlocks`, and the checks of their inputs."""

    in_channels: int
    model_channels: int
    downsample_factor: int
    context_dim: int | None = None
    num_classes: int | None = None

    def compile_regions(self) -> list[nn.Module]:
        """The blocks that regional ``torch.compile`` compiles one by one
        (:func:`~ldm_lightning.models.speed.compile_net`): the time embedding MLP, every input
        block and the middle block."""
        return [self.time_embed, *self.input_blocks, self.middle_block]

    def embed_time(self, timesteps: Tensor) -> Tensor:
        """``[B]`` timesteps -> the time embedding ``[B, 4 * model_channels]``."""
        t_emb = timestep_embedding(timesteps, self.model_channels)
        return self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))

    def down(
        self, x: Tensor, emb: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """The middle block's output and every input block's (the skip connections)."""
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        return self.middle_block(h, emb, context), skips

    def _check_inputs(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        class_labels: Tensor | None = None,
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
