"""NoisyClassifierModule: training, checkpoints, guiding an LDM's samples, refusing a mismatch."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ldm_lightning.data.shapes import ShapesDataModule, ShapesDataset
from ldm_lightning.diffusion.processes import FlowProcess
from ldm_lightning.models import LatentDiffusionModule, NoisyClassifierModule
from ldm_lightning.models.checkpoints import KIND_KEY, export_stage, load_stage
from ldm_lightning.models.noisy_classifier import noise_to_signal
from ldm_lightning.sample import run as sample_run
from ldm_lightning.train import train
from tests.checkpoint_utils import write_checkpoint
from tests.hydra_utils import compose_config
from tests.models.test_conditioning import conditioning_config, tiny_ldm
from tests.models.test_diffusion_module import TINY_UNET, tiny_pixel_ddpm
from tests.nn.test_unet import _randomise as randomise_zero_parameters

TINY_CLASSIFIER = dict(TINY_UNET)
# The tiny pixel LDM's process and latent space (tests.models.test_diffusion_module).
PIXEL = {"first_stage": {"identity": True}, "schedule": {"kind": "linear", "timesteps": 100},
         "scale_factor": 1.0}
SHAPES = ShapesDataModule(image_size=16, batch_size=4, num_train=8, num_val=4, num_test=4)
TRAIN = [
    "+experiment=shapes_noisy_classifier", "model.first_stage.identity=true",
    "data.image_size=16", "data.batch_size=8", "data.num_train=16", "data.num_val=8",
    "data.num_test=8", "model.classifier.model_channels=16", "model.classifier.channel_mult=[1,2]",
    "model.classifier.attention_resolutions=[2]", "model.classifier.num_head_channels=8",
    "model.scale_factor_batches=2", "trainer.max_epochs=1", "logger=csv",
]


def tiny_classifier(**overrides) -> NoisyClassifierModule:
    """A classifier of the tiny pixel LDM's latent space, with random weights (its zero-initialised
    head would make every gradient 0)."""
    arguments = {"classifier": TINY_CLASSIFIER, "num_classes": 18, **PIXEL, **overrides}
    return randomise_zero_parameters(NoisyClassifierModule(**arguments)).eval()


def test_training_lowers_the_loss_and_beats_chance_at_low_noise() -> None:
    """40 steps on a batch of 16 px shapes in pixel space, on the experiment's DDPM process."""
    torch.manual_seed(0)
    model = NoisyClassifierModule(
        classifier={**TINY_CLASSIFIER, "model_channels": 32}, first_stage={"identity": True},
        num_classes=18, scale_factor=1.0, schedule={"kind": "scaled_linear"},
    )
    batch = next(iter(DataLoader(ShapesDataset(16, 16), batch_size=16)))
    z0, labels = model.latents(batch).repeat(8, 1, 1, 1), batch["label"].repeat(8)
    low, high = model.noise_bands()

    def fixed() -> tuple[float, float, float]:
        """Loss, and accuracy at low and at high noise, on 8 noisings of the batch."""
        with torch.no_grad():
            logits, t = model.noisy_logits(z0, torch.Generator().manual_seed(123))
        correct = (logits.argmax(dim=-1) == labels).float()
        ratios = noise_to_signal(model.process, t)
        return (F.cross_entropy(logits, labels).item(), correct[ratios <= low].mean().item(),
                correct[ratios > high].mean().item())

    before = fixed()
    assert before[0] == pytest.approx(math.log(18))  # the zero-initialised head: uniform
    optimizer = torch.optim.Adam(model.classifier.parameters(), lr=3e-3)
    for step in range(40):
        logits, _ = model.noisy_logits(z0[:16], torch.Generator().manual_seed(step))
        loss = F.cross_entropy(logits, labels[:16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss, low_noise, high_noise = fixed()
    assert loss < before[0] - 0.5
    assert low_noise > 4 / 18 and low_noise > high_noise


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The experiment, tiny, in pixel space (an identity first stage)."""
    run = tmp_path_factory.mktemp("classifier")
    torch.save(train(compose_config(TRAIN, run)), run / "metrics.pt")
    return run


def test_a_run_logs_its_accuracies_and_takes_its_classes_from_the_data(
    classifier_run: Path,
) -> None:
    metrics = torch.load(classifier_run / "metrics.pt", weights_only=True)
    for prefix in ("val", "test"):
        assert {f"{prefix}/{name}" for name in ("loss", "acc", "acc_low_noise", "acc_high_noise")
                } <= set(metrics)
    assert {"train/loss_epoch", "train/acc_epoch", "scale_factor"} <= set(metrics)


def test_the_checkpoint_loads_weights_only_with_its_classes_and_normalisation(
    classifier_run: Path,
) -> None:
    path = classifier_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint[KIND_KEY] == "noisy_classifier"
    assert checkpoint["scale_factor"] is not None
    hparams = checkpoint["hyper_parameters"]
    assert hparams["num_classes"] == 18 and hparams["class_names"] == SHAPES.class_names
    loaded = NoisyClassifierModule.load_from_checkpoint(path)
    assert loaded.scale_factor == checkpoint["scale_factor"]
    assert loaded.class_names == SHAPES.class_names
    assert torch.equal(loaded.classifier.out[-1].weight,
                       checkpoint["state_dict"]["classifier.out.4.weight"])
    with pytest.raises(ValueError, match="is a noisy_classifier checkpoint, but an latent_diff"):
        load_stage(LatentDiffusionModule, path, "latent_diffusion")
    exported = NoisyClassifierModule.load_from_checkpoint(
        export_stage(path, classifier_run / "export")
    )
    assert exported.class_names == loaded.class_names
    assert exported.scale_factor == loaded.scale_factor
    for name, value in loaded.state_dict().items():
        assert torch.equal(exported.state_dict()[name], value)


def test_classes_other_than_the_datas_are_refused() -> None:
    model = tiny_classifier(class_names=[f"c{i}" for i in range(18)])
    with pytest.raises(ValueError, match=r"18 classes \(c0, c1, .*are not the data's 18"):
        model.adopt_data(SHAPES)
    unlabelled = SimpleNamespace(num_classes=0, class_names=None)
    with pytest.raises(ValueError, match="the noisy classifier needs labelled data"):
        tiny_classifier().adopt_data(unlabelled)


# ---------------------------------------------------------------------------- guidance
def unconditional_ldm() -> LatentDiffusionModule:
    torch.manual_seed(0)
    return randomise_zero_parameters(tiny_pixel_ddpm(sampling={"steps": 3})).eval()


def test_guided_samples_differ_and_scale_zero_does_not_guide() -> None:
    ldm, classifier = unconditional_ldm(), tiny_classifier(class_names=SHAPES.class_names)
    plain = ldm.sample(n=2, seed=0)
    guided = ldm.sample(n=2, seed=0, labels=[0, SHAPES.class_names[5]], classifier=classifier,
                        classifier_scale=20.0)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain, atol=1e-3)
    assert torch.equal(ldm.sample(n=2, seed=0, labels=[0, 5], classifier=classifier), plain)
    other_class = ldm.sample(n=2, seed=0, labels=[7, 7], classifier=classifier,
                             classifier_scale=20.0)
    assert not torch.allclose(guided, other_class, atol=1e-3)


def test_classifier_guidance_on_top_of_classifier_free_guidance() -> None:
    torch.manual_seed(0)
    ldm = tiny_ldm(conditioning_config("class", num_classes=3, class_route="both", width=8))
    classifier = tiny_classifier(num_classes=3)
    cfg_only = ldm.sample(n=2, labels=[0, 2], guidance_scale=3.0)
    both = ldm.sample(n=2, labels=[0, 2], guidance_scale=3.0, classifier=classifier,
                      classifier_scale=20.0)
    assert not torch.allclose(cfg_only, both, atol=1e-3)
    # With the model's null condition, the labels guide through the classifier alone.
    ldm.sample(n=2, labels=[0, 2], unconditional=True, classifier=classifier,
               classifier_scale=20.0)


TINY_AUTOENCODER = {"regularizer": "kl", "image_size": 8, "ch": 8, "ch_mult": [1, 2],
                    "num_res_blocks": 1, "z_channels": 2, "embed_dim": 2}


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"first_stage": {"hparams": TINY_AUTOENCODER, "sha256": "another"}}, "first stage"),
        ({"scale_factor": 0.5}, r"latent normalisation LatentNormalizer\(scalar, scale_factor=0.5"),
        ({"latent_norm": "channel", "scale_factor": None}, "latent normalisation"),
        ({"process": {"_target_": f"{FlowProcess.__module__}.FlowProcess"}},
         "noise process FlowProcess vs the model's DDPMProcess"),
    ],
)
def test_a_classifier_of_another_latent_space_is_refused(settings: dict, match: str) -> None:
    classifier = tiny_classifier(**settings)
    if classifier.latent_norm.mode == "channel":
        classifier.latent_norm.mean, classifier.latent_norm.std = [0.0] * 3, [1.0] * 3
    with pytest.raises(ValueError, match=f"this classifier cannot guide this model: .*{match}"):
        unconditional_ldm().sample(n=2, labels=[0, 1], classifier=classifier,
                                   classifier_scale=1.0)


def test_near_equal_normalisations_pass_and_another_schedule_fails_at_the_first_level() -> None:
    ldm = unconditional_ldm()
    ldm.sample(n=1, labels=[3], classifier=tiny_classifier(scale_factor=1.005),
               classifier_scale=1.0)
    other_schedule = tiny_classifier(schedule={"kind": "cosine", "timesteps": 100})
    with pytest.raises(ValueError, match="train the classifier on the process and schedule"):
        ldm.sample(n=1, labels=[3], classifier=other_schedule, classifier_scale=1.0)


def test_the_same_autoencoder_from_two_files_is_the_same_first_stage() -> None:
    torch.manual_seed(1)
    first_stage = {"hparams": TINY_AUTOENCODER, "sha256": "ckpt"}
    ldm = tiny_pixel_ddpm(first_stage=first_stage, image_size=8)
    classifier = tiny_classifier(first_stage={**first_stage, "sha256": "export"})
    classifier.first_stage.load_state_dict(ldm.first_stage.state_dict())
    classifier.check_guides(ldm)
    torch.nn.init.normal_(classifier.first_stage.quant_conv.weight)
    with pytest.raises(ValueError, match="first stage"):
        classifier.check_guides(ldm)


def test_other_classes_and_missing_labels_or_classifier_are_refused() -> None:
    class_ldm = tiny_ldm(conditioning_config("class", num_classes=3, class_names=["a", "b", "c"]))
    with pytest.raises(ValueError, match=r"18 classes .* vs the model's 3"):
        class_ldm.sample(n=1, labels=[0], classifier=tiny_classifier(), classifier_scale=1.0)
    renamed = tiny_classifier(num_classes=3, class_names=["a", "b", "d"])
    with pytest.raises(ValueError, match=r"\['a', 'b', 'd'\] vs the model's 3 \['a', 'b', 'c'\]"):
        class_ldm.sample(n=1, labels=[0], classifier=renamed, classifier_scale=1.0)
    ldm = unconditional_ldm()
    with pytest.raises(ValueError, match="classifier guidance needs the classes to guide towards"):
        ldm.sample(n=1, classifier=tiny_classifier(), classifier_scale=1.0)
    with pytest.raises(ValueError, match="classifier_scale=2.0 needs a classifier"):
        ldm.sample(n=1, classifier_scale=2.0)
    with pytest.raises(ValueError, match="unknown class name 'dog'; labels=.* or names: red"):
        ldm.sample(n=1, labels=["dog"], classifier=tiny_classifier(class_names=SHAPES.class_names),
                   classifier_scale=1.0)


def test_the_sample_entry_point_guides_with_a_classifier_checkpoint(tmp_path: Path) -> None:
    ldm_ckpt = write_checkpoint(unconditional_ldm(), tmp_path / "ldm.ckpt")
    classifier = tiny_classifier(class_names=SHAPES.class_names)
    classifier_ckpt = write_checkpoint(classifier, tmp_path / "classifier.ckpt")

    def written(name: str, *overrides: str) -> list[torch.Tensor]:
        out = tmp_path / name
        cfg = compose_config([f"ckpt_path={ldm_ckpt}", "num_samples=2", "device=cpu",
                              *overrides], out, config_name="sample")
        sample_run(cfg)
        return [p.read_bytes() for p in sorted((out / "samples").glob("*.png"))]

    plain = written("plain")
    guided = written("guided", f"classifier_ckpt={classifier_ckpt}", "classifier_scale=20",
                     "labels=[0,5]")
    assert len(guided) == 2 and (tmp_path / "guided" / "grid.png").is_file()
    assert guided != plain
    # per_class takes the classes of the classifier that guides an unconditional model.
    written("per_class", f"classifier_ckpt={classifier_ckpt}", "classifier_scale=20",
            "per_class=1", "labels=[3,red circle]")
    folders = sorted(p.name for p in (tmp_path / "per_class" / "samples").iterdir())
    assert folders == ["red circle", "yellow circle"]
    with pytest.raises(ValueError, match="classifier_scale=3 needs a classifier"):
        written("refused", "classifier_scale=3")
