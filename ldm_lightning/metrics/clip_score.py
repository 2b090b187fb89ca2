"""CLIP score of text-conditional samples (Hessel et al. 2021, eq. 1), by torchmetrics.

``CLIPScore(x, c) = 100 * max(cos(E_I(x), E_T(c)), 0)``, averaged over the samples: how well
each image matches the caption it was drawn with, in the embedding space of a CLIP model
(Radford et al. 2021). The model is a transformers CLIP (``openai/clip-vit-large-patch14``,
torchmetrics' default, or a folder written by ``save_pretrained``), read from the Hugging Face
cache only: nothing is downloaded here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from torch import Tensor, nn
from torchmetrics.multimodal.clip_score import CLIPScore

__all__ = ["ClipScore"]


class _ProjectedFeatures(nn.Module):
    """A CLIP model whose ``get_image_features`` / ``get_text_features`` return the projected
    embeddings ``[B, D]``, as torchmetrics expects: transformers >= 5 returns a model output
    holding them as ``pooler_output``."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _embeddings(output: Any) -> Tensor:
        return output if isinstance(output, Tensor) else output.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._embeddings(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._embeddings(self.clip.get_text_features(*args, **kwargs))


class ClipScore:
    """``update(images [B, 3, H, W] in [-1, 1], prompts)``, then ``compute()`` ->
    ``{"clip_score": float}``. Images reach CLIP as 8-bit pixels (its processor resizes them)."""

    def __init__(self, model: str) -> None:
        import transformers
        from huggingface_hub.constants import HF_HUB_CACHE

        try:
            clip = transformers.CLIPModel.from_pretrained(model, local_files_only=True)
            processor = transformers.CLIPProcessor.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as error:  # not cached / not a valid name or folder
            raise FileNotFoundError(
                f"the CLIP score reads the CLIP model {model!r} from the Hugging Face cache "
                f"({HF_HUB_CACHE}) or a folder, and it is not there "
                f"({error}). On a machine with network access run python -c \"import "
                f"transformers; transformers.CLIPModel.from_pretrained('{model}'); "
                f"transformers.CLIPProcessor.from_pretrained('{model}')\" and copy the cache "
                "(or set clip_model to a saved folder); or drop clip_score from protocol.metrics."
            ) from error
        self.identity = f"{type(clip).__name__}:{model}"
        resample = getattr(processor.image_processor, "resample", None)
        filter = PIL.Image.Resampling(resample).name.lower() if resample is not None else "none"
        self.resize = f"{filter} (the CLIP processor's)"
        model = _ProjectedFeatures(clip.eval())
        self.metric = CLIPScore(model_name_or_path=lambda: (model, processor))

    @torch.no_grad()
    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        pixels = ((images.float() + 1) / 2).clamp(0, 1).mul(255).byte()
        self.metric.update(list(pixels.cpu()), list(prompts))

    def compute(self) -> dict[str, float]:
        return {"clip_score": float(self.metric.compute())}
