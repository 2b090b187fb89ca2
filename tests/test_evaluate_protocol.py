"""The evaluation protocol of `python -m ldm_lightning.evaluate`: precision/recall, FD-DINOv2
and the CLIP score on tiny checkpoints with injected networks; the same numbers twice."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import open_dict
from torch import nn

from ldm_lightning.evaluate import evaluate
from ldm_lightning.metrics.clip_score import ClipScore
from ldm_lightning.metrics.fid import (
    build_feature_extractor,
    extract,
    frechet_distance,
    gaussian_statistics,
)
from ldm_lightning.metrics.precision_recall import precision_recall
from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.sampling import sampling_options
from tests.checkpoint_utils import write_checkpoint
from tests.metrics.test_protocol_metrics import write_tiny_clip_model
from tests.models.test_conditioning import CAPTIONS, TEXT, conditioning_config, tiny_ldm
from tests.test_evaluate import (  # noqa: F401 - checkpoints is a fixture
    TinyFeatures,
    checkpoints,
    eval_config,
    run_images,
)

DINO = "tests.test_evaluate_protocol.TinyDino"
PROTOCOL = [
    "protocol.num_samples=12", "batch_size=6", "protocol.kid_subset_size=6",
    "protocol.metrics=[kid,precision_recall,fd_dinov2]", "protocol.prc_neighborhood=2",
    f"dinov2_extractor={DINO}",
]


class TinyDino(nn.Module):
    """A DINOv2 stand-in with an input size (8 px), so the protocol's filter resizes for it."""

    input_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 6)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator))
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == self.input_size
        return torch.tanh(self.proj(nn.functional.avg_pool2d(x, 2).flatten(1)))


def config(run: Path, ckpt: Path, stats: Path, *overrides: str):
    cfg = eval_config(run, ckpt, *overrides)
    with open_dict(cfg):
        cfg.stats_dir = str(stats)
    return cfg


def test_the_same_protocol_on_the_same_checkpoint_gives_the_same_numbers_twice(
    checkpoints, tmp_path, capsys  # noqa: F811 - the fixture
) -> None:
    # The second run reads the real features from the cache the first one wrote.
    reports = [evaluate(config(tmp_path / run, checkpoints["ldm"], tmp_path / "stats", *PROTOCOL))
               for run in ("a", "b")]
    assert reports[1]["metrics"] == reports[0]["metrics"]
    assert reports[1]["protocol"] == reports[0]["protocol"]
    metrics, protocol = reports[0]["metrics"], reports[0]["protocol"]
    assert protocol["num_samples"] == 12 and protocol["seed"] == 0 and protocol["batch_size"] == 6
    assert protocol["split"] == "train" and protocol["resize"] == "bicubic"
    assert protocol["metrics"] == ["fid", "kid", "precision_recall", "fd_dinov2"]
    assert protocol["extractors"]["fd_dinov2"]["network"].endswith("@8px-bicubic")
    assert protocol["extractors"]["fid"]["resize"] == "none"  # the 16 px stand-in takes any size
    printed = (f"protocol {protocol['digest']}: 12 samples (batch b of 6: seed 0 + b) vs all "
               "real images of the train split, resize bicubic, metrics fid, kid, "
               "precision_recall, fd_dinov2")
    assert capsys.readouterr().out.count(printed) == 2

    # The same numbers by hand: batches of 6 with seeds 0 and 1, 16 real training images.
    module = load_stage(LatentDiffusionModule, checkpoints["ldm"], "latent_diffusion")
    fake = torch.cat([module.sample(n=6, seed=seed) for seed in (0, 1)])
    real = run_images(checkpoints["ldm"], "train")
    dino = build_feature_extractor(TinyDino(), resize="bicubic")
    dino_real, dino_fake = extract(dino, real)[0], extract(dino, fake)[0]
    expected_fd = frechet_distance(*gaussian_statistics(dino_real.numpy()),
                                   *gaussian_statistics(dino_fake.numpy()))
    assert expected_fd > 0.01 and metrics["fd_dinov2"] == pytest.approx(expected_fd, rel=1e-3)
    tiny = TinyFeatures()
    expected = precision_recall(extract(tiny, fake)[0], extract(tiny, real)[0], k=2)
    assert metrics["precision"] == expected["precision"]
    assert metrics["recall"] == expected["recall"]


def test_another_resize_filter_is_another_protocol(checkpoints, tmp_path) -> None:  # noqa: F811
    reports = [
        evaluate(config(tmp_path / f, checkpoints["ldm"], tmp_path / "stats", *PROTOCOL,
                        f"protocol.resize={f}"))
        for f in ("bicubic", "tf1_bilinear")
    ]
    assert reports[0]["protocol"]["digest"] != reports[1]["protocol"]["digest"]
    assert reports[0]["metrics"]["fd_dinov2"] != reports[1]["metrics"]["fd_dinov2"]
    assert reports[0]["metrics"]["fid"] == reports[1]["metrics"]["fid"]  # any-size stand-in
    assert len(list((tmp_path / "stats").glob("shapes-train-16px-*.pt"))) == 3


def test_a_bad_protocol_is_refused_before_any_work(checkpoints, tmp_path) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="protocol.resize='lanczos' is unknown; choose one of"):
        evaluate(eval_config(tmp_path, checkpoints["ldm"], "protocol.resize=lanczos"))
    with pytest.raises(ValueError, match="this checkpoint is not text-conditional; drop clip_sc"):
        evaluate(eval_config(tmp_path, checkpoints["ldm"], "protocol.metrics=[clip_score]"))
    assert not (tmp_path / "stats").exists()  # no real features were extracted


def test_clip_score_of_a_text_model_scores_each_sample_against_its_caption(tmp_path) -> None:
    torch.manual_seed(0)
    text_ldm = tiny_ldm(conditioning_config("text", width=8, text=TEXT))
    text_ldm.conditioner.text.fit_tokenizer(CAPTIONS)
    ckpt = write_checkpoint(text_ldm, tmp_path / "text_ldm.ckpt")
    clip = write_tiny_clip_model(tmp_path / "clip")
    cfg = eval_config(tmp_path / "run", ckpt, "data.image_size=8", "data.num_train=8",
                      "protocol.num_samples=4", "batch_size=2", "protocol.metrics=[clip_score]",
                      f"clip_model={clip}")
    report = evaluate(cfg)
    assert report["protocol"]["extractors"]["clip_score"] == {
        "network": f"CLIPModel:{clip}", "resize": "bicubic (the CLIP processor's)"}

    # By hand: batch b (seed b) drawn with the captions of training images 2b, 2b + 1.
    module = load_stage(LatentDiffusionModule, ckpt, "latent_diffusion")
    captions = hydra.utils.instantiate(cfg.data).captions("train")
    score = ClipScore(str(clip))
    for b in range(2):
        prompts = captions[2 * b: 2 * b + 2]
        score.update(module.sample(n=2, seed=b, prompts=prompts, **sampling_options(cfg)), prompts)
    assert report["metrics"]["clip_score"] == pytest.approx(score.compute()["clip_score"])
