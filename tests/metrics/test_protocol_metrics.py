"""Precision/recall, resize filters, the DINOv2 extractor and the CLIP score, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from ldm_lightning.metrics.clip_score import ClipScore
from ldm_lightning.metrics.dinov2 import DinoV2Features
from ldm_lightning.metrics.fid import (
    GenerativeMetrics,
    build_feature_extractor,
    extract,
    extractor_identity,
)
from ldm_lightning.metrics.precision_recall import precision_recall
from ldm_lightning.metrics.resize import Resized, resize_images
from tests.clip_utils import write_tiny_clip
from tests.metrics.test_fid import CountingFeatures, images


def points(*values: float) -> torch.Tensor:
    return torch.tensor(values).unsqueeze(1)  # [N, 1] features


def test_precision_and_recall_by_hand_with_one_neighbour() -> None:
    # Real 0..4: every ball has radius 1. Generated 0.5, 2.2 (radius 1.7), 50, 51 (radius 1).
    real, generated = points(0, 1, 2, 3, 4), points(0.5, 2.2, 50, 51)
    result = precision_recall(generated, real, k=1)
    assert result["precision"] == pytest.approx(2 / 4)  # 0.5 and 2.2 are inside real balls
    assert result["recall"] == pytest.approx(4 / 5)  # 4 is 1.8 from 2.2, outside radius 1.7


def test_precision_and_recall_of_a_set_against_itself_are_one() -> None:
    features = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(features, features) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_needs_more_images_than_neighbours() -> None:
    with pytest.raises(ValueError, match="more than 3 real and generated images, got 10 and 3"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2))


def test_generative_metrics_report_precision_recall_of_the_extracted_features() -> None:
    extractor = CountingFeatures()
    real, fake = images(30, 0), images(20, 1, scale=0.5)
    real_features = extract(extractor, real)[0]
    metrics = GenerativeMetrics(extractor, real_features, precision_recall=True,
                                prc_neighborhood=2)
    for chunk in fake.split(8):
        metrics.update(chunk)
    result = metrics.compute()
    expected = precision_recall(extract(extractor, fake)[0], real_features, k=2)
    assert result["precision"] == expected["precision"]
    assert result["recall"] == expected["recall"]
    assert 0 < result["recall"] < 1  # the half-contrast samples cover part of the real set


def test_resize_filters_differ_and_keep_the_size_they_are_given() -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255
    bicubic, tf1 = resize_images(x, 24, "bicubic"), resize_images(x, 24, "tf1_bilinear")
    assert bicubic.shape == tf1.shape == (2, 3, 24, 24)
    assert (bicubic - tf1).abs().max() > 1  # grey levels apart: the filter is part of the protocol
    assert resize_images(x, 16, "bicubic") is x
    with pytest.raises(ValueError, match="choose one of"):
        resize_images(x, 24, "lanczos")


class SizedFeatures(nn.Module):
    """A net with an input size: records what it was fed."""

    input_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return self.proj(x.mean((2, 3)))


def test_a_net_with_an_input_size_gets_quantised_images_resized_by_the_filter() -> None:
    net = SizedFeatures()
    extractor = build_feature_extractor(net, resize="bilinear")
    assert isinstance(extractor, Resized)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    extractor(x)
    pixels = (x * 255).byte().float()
    expected = torch.nn.functional.interpolate(pixels, (8, 8), mode="bilinear", antialias=True)
    torch.testing.assert_close(net.seen[0], expected.clamp(0, 255) / 255)
    # The filter is in the identity, so real features cached under another filter are not reused.
    other = build_feature_extractor(SizedFeatures(), resize="bicubic")
    assert extractor_identity(extractor).endswith("@8px-bilinear")
    assert extractor_identity(other).endswith("@8px-bicubic")


def test_dinov2_offline_names_the_missing_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        build_feature_extractor("dinov2")
    message = str(error.value)
    assert str(tmp_path / "facebookresearch_dinov2_main" / "hubconf.py") in message
    assert str(tmp_path / "checkpoints" / "dinov2_vitl14_pretrain.pth") in message
    assert "torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')" in message


HUBCONF = '''import torch

def dinov2_vitl14():
    torch.manual_seed(0)  # 224 px in: 4 x 4 pooled cells of 3 channels
    return torch.nn.Sequential(torch.nn.AvgPool2d(56), torch.nn.Flatten(), torch.nn.Linear(48, 5))
'''


def test_dinov2_loads_from_the_hub_cache_and_sees_normalised_224px_images(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "facebookresearch_dinov2_main").mkdir()
    (tmp_path / "facebookresearch_dinov2_main" / "hubconf.py").write_text(HUBCONF)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "dinov2_vitl14_pretrain.pth").write_bytes(b"")
    extractor = build_feature_extractor("dinov2", resize="bicubic")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    features = extractor(x)
    assert features.shape == (2, 5)
    dinov2 = extractor.net
    assert isinstance(dinov2, DinoV2Features) and extractor.input_size == 224
    resized = resize_images((x * 255).byte().float(), 224, "bicubic").clamp(0, 255) / 255
    torch.testing.assert_close(features, dinov2.net((resized - dinov2.mean) / dinov2.std))
    assert extractor_identity(extractor) == (
        "facebookresearch/dinov2:dinov2_vitl14_pretrain.pth@224px-bicubic"
    )


def write_tiny_clip_model(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer CLIP (text and 16 px vision towers, weights drawn with ``seed``) and its
    processor, saved."""
    write_tiny_clip(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = transformers.CLIPTextConfig.from_pretrained(folder).to_dict()
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=16, patch_size=8,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text, vision_config=vision.to_dict(), projection_dim=16,
    ))
    model.save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def test_clip_score_is_100_times_the_clamped_cosine_of_the_embeddings(tmp_path: Path) -> None:
    folder = write_tiny_clip_model(tmp_path / "clip")
    score = ClipScore(str(folder))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    prompts = ["a red circle on a gray background", "a blue square on a white background"] * 2
    score.update(x[:2], prompts[:2])
    score.update(x[2:], prompts[2:])
    result = score.compute()["clip_score"]

    model = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    pixels = list(((x + 1) / 2 * 255).byte())
    with torch.no_grad():
        image = model.get_image_features(**processor(images=pixels, return_tensors="pt"))
        text = model.get_text_features(**processor(text=prompts, return_tensors="pt",
                                                   padding=True))
    image, text = (getattr(e, "pooler_output", e) for e in (image, text))
    cosine = torch.nn.functional.cosine_similarity(image, text)
    assert result == pytest.approx(float((100 * cosine).clamp(min=0).mean()), rel=1e-4)
    assert score.resize == "bicubic (the CLIP processor's)"


def test_clip_score_offline_names_the_model_and_the_cache() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-clip.*Hugging Face cache"):
        ClipScore("no-such-org/no-such-clip")
