"""The first stage of a latent diffusion model as a plain module: encoder, regulariser, decoder.

``x [B, 3, H, W] -> z = E(x) [B, embed_dim, H/f, W/f] -> x' = D(z)`` with f = 2^(len(ch_mult)-1)
(LDM sec. 3.1), regularised by a vector-quantised codebook (VQ) or a diagonal Gaussian posterior
with a KL term. Parameter names follow CompVis' first-stage models (``encoder.*``,
``quant_conv.*``, ``quantize.embedding.weight``, ``post_quant_conv.*``, ``decoder.*``), so their
released weights load with :meth:`FirstStage.load_compvis_state_dict`.

No loss, discriminator or optimiser here: a later stage holds this module frozen, and
:class:`~ldm_lightning.models.autoencoder.AutoencoderModule` trains it. With
:class:`IdentityFirstStage` "latents" are pixels, so latent vs pixel diffusion is one switch.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ldm_lightning.nn.distributions import DiagonalGaussian
from ldm_lightning.nn.encoder_decoder import Decoder, Encoder
from ldm_lightning.nn.quantizer import VectorQuantizer

REGULARIZERS = ("vq", "kl")
# The submodules of a FirstStage: the first name of each of its state-dict keys.
PARTS = ("encoder", "quant_conv", "quantize", "post_quant_conv", "decoder")


def is_first_stage_key(name: str) -> bool:
    """Whether ``name`` (a state-dict key) belongs to a :class:`FirstStage`'s parts."""
    return name.split(".", 1)[0] in PARTS


class FirstStage(nn.Module):
    """VQ or KL autoencoder network (LDM sec. 3.1). See the module docstring.

    Args:
        regularizer: "vq" (codebook of ``n_embed`` codes) or "kl" (Gaussian posterior).
        image_size: resolution of the images; must be divisible by ``f``.
        in_channels: image channels.
        ch, ch_mult, num_res_blocks, attn_resolutions, dropout, z_channels: the encoder and
            decoder (:mod:`ldm_lightning.nn.encoder_decoder`); ``attn_resolutions`` are feature
            map sizes at which self-attention is used.
        embed_dim: latent channels after ``quant_conv`` (the channels a later stage sees).
        n_embed, beta, ema_codebook, ema_decay, restart_dead_codes: the VQ codebook
            (:class:`~ldm_lightning.nn.quantizer.VectorQuantizer`).

    ``config`` holds these arguments as built (defaults included): what a later stage records
    to rebuild it, with :meth:`from_config`.
    """

    def __init__(
        self,
        *,
        regularizer: str = "vq",
        image_size: int = 256,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Iterable[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Iterable[int] = (),
        dropout: float = 0.0,
        z_channels: int = 3,
        embed_dim: int = 3,
        n_embed: int = 8192,
        beta: float = 0.25,
        ema_codebook: bool = False,
        ema_decay: float = 0.99,
        restart_dead_codes: bool = False,
    ) -> None:
        arguments = dict(locals())  # every argument, defaults included: nothing else is bound
        super().__init__()
        self.config = {name: arguments[name] for name in ARGUMENTS}
        if regularizer not in REGULARIZERS:
            raise ValueError(f"model.regularizer={regularizer!r} is unknown; valid: {REGULARIZERS}")
        ch_mult = tuple(ch_mult)
        self.factor = 2 ** (len(ch_mult) - 1)
        if image_size % self.factor:
            raise ValueError(
                f"data.image_size={image_size} is not divisible by the autoencoder's downsampling "
                f"factor f={self.factor} (ch_mult={list(ch_mult)}); use an image_size that is a "
                f"multiple of {self.factor}."
            )
        net = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            resolution=image_size,
            z_channels=z_channels,
            dropout=dropout,
        )
        self.regularizer = regularizer
        self.embed_dim = embed_dim
        self.encoder = Encoder(in_channels=in_channels, double_z=regularizer == "kl", **net)
        self.decoder = Decoder(out_ch=in_channels, in_channels=in_channels, **net)
        moments = 2 if regularizer == "kl" else 1
        self.quant_conv = nn.Conv2d(moments * z_channels, moments * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if regularizer == "vq":
            self.quantize = VectorQuantizer(
                n_embed,
                embed_dim,
                beta=beta,
                use_ema=ema_codebook,
                ema_decay=ema_decay,
                restart_dead_codes=restart_dead_codes,
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FirstStage:
        """Build from ``config``, ignoring keys that are not arguments of this class (an
        autoencoder's hyperparameters also hold its loss, optimiser and speed switches)."""
        return cls(**{k: v for k, v in config.items() if k in ARGUMENTS})

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def encode(
        self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """``x [B, 3, H, W]`` in [-1, 1] -> latent ``[B, embed_dim, H/f, W/f]``.

        VQ: the pre-quantisation latent (as CompVis' VQModelInterface; :meth:`decode`
        quantises). KL: the posterior mean, or a sample when ``sample=True``.
        """
        moments = self.quant_conv(self.encoder(x))
        if self.regularizer == "vq":
            return moments
        posterior = DiagonalGaussian(moments)
        return posterior.sample(generator) if sample else posterior.mode()

    def decode(self, z: Tensor) -> Tensor:
        """Latent ``[B, embed_dim, h, w]`` -> image ``[B, 3, h*f, w*f]`` (VQ: quantised first)."""
        if self.regularizer == "vq":
            z, _, _ = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Reconstruct ``x``; returns ``(x_hat, regulariser loss, info)``.

        The regulariser is the VQ codebook + beta * commitment loss (VQ-VAE eq. 3), or the KL
        divergence to N(0, I) summed over latent dimensions and averaged over the batch.
        """
        moments = self.quant_conv(self.encoder(x))
        if self.regularizer == "vq":
            z, reg, info = self.quantize(moments)
        else:
            posterior = DiagonalGaussian(moments)
            z = posterior.sample() if sample_posterior else posterior.mode()
            reg, info = posterior.kl().mean(), {}
        return self.decoder(self.post_quant_conv(z)), reg, info

    def load_compvis_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load a CompVis first-stage ``state_dict`` (its ``loss.*`` ignored) into this module.

        The architecture arguments must match the checkpoint's config. Keys this module has and
        CompVis' lacks are only EMA/usage buffers of the quantiser, which keep their initial
        values; anything else missing or unexpected is an error.
        """
        weights = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
        ours = {k for k in self.state_dict() if is_first_stage_key(k)}
        missing = ours - set(weights)
        unexpected = set(weights) - ours
        allowed_missing = {
            k for k in missing if k.startswith("quantize.") and k != "quantize.embedding.weight"
        }
        if unexpected or missing - allowed_missing:
            raise ValueError(
                "the CompVis checkpoint does not match this autoencoder's architecture: "
                f"missing {sorted(missing - allowed_missing)[:8]}, "
                f"unexpected {sorted(unexpected)[:8]}. Set model.ch, ch_mult, num_res_blocks, "
                "z_channels, embed_dim, n_embed as in its config.yaml."
            )
        self.load_state_dict(weights, strict=False)


ARGUMENTS = tuple(inspect.signature(FirstStage).parameters)


class IdentityFirstStage(nn.Module):
    """``encode`` and ``decode`` are the identity; ``factor`` 1 (pixel-space diffusion)."""

    factor = 1

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.latent_channels = channels

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z
