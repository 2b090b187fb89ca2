"""Few-shot fine-tuning (DreamBooth): the loss of eq. 2, what trains, the prior set, the
checkpoint as a plain LDM, and the errors; on a tiny pixel-space base."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch

from ldm_lightning.data.instance import InstanceDataModule
from ldm_lightning.models import LatentDiffusionModule, connect
from ldm_lightning.models.checkpoints import load_stage, read_checkpoint
from ldm_lightning.models.finetune import FinetuneModule, grow_class_table
from ldm_lightning.models.prior import PriorSpec, prior_images
from ldm_lightning.nn.lora import ADAPTER, lora_layers
from ldm_lightning.sample import run as sample_run
from ldm_lightning.train import train
from tests.checkpoint_utils import write_checkpoint
from tests.data.test_instance import instance_folder
from tests.hydra_utils import compose_config
from tests.models.test_conditioning import CAPTIONS, TEXT, conditioning_config, tiny_ldm

CLASSES = ["red circle", "green circle", "blue circle"]
LORA = {"rank": 2, "alpha": 4}


def write_base(path: Path, conditioning: dict | None) -> Path:
    ldm = tiny_ldm(conditioning)
    if conditioning and "text" in conditioning:
        ldm.conditioner.text.fit_tokenizer(CAPTIONS)
    return write_checkpoint(ldm, path)


@pytest.fixture
def class_base(tmp_path: Path) -> Path:
    config = conditioning_config("class", num_classes=3, class_names=CLASSES, p_uncond=0.0)
    return write_base(tmp_path / "base.ckpt", config)


def finetuned(base: Path, tmp_path: Path, lora: dict | None = None, **settings) -> FinetuneModule:
    settings = {"new_class": "orange circle", "ckpt_path": str(base), "lora": lora,
                "prior": {"weight": 0.5, "num": 6, "dir": str(tmp_path / "prior")}, **settings}
    return FinetuneModule(finetune=settings, sampling={"steps": 2})


def batch(n: int = 4) -> dict:
    return {"image": torch.rand(n, 3, 8, 8) * 2 - 1, "label": torch.zeros(n, dtype=torch.long)}


def unet_output(model: LatentDiffusionModule, labels: list[int]) -> torch.Tensor:
    x = torch.randn(len(labels), 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.unet(x, torch.full((len(labels),), 10), class_labels=torch.tensor(labels))


def test_the_class_table_grows_by_the_new_row_before_the_null_row() -> None:
    table = torch.arange(8.0).view(4, 2)  # 3 classes and the null row
    assert grow_class_table(table, "mean").tolist() == [[0, 1], [2, 3], [4, 5], [2, 3], [6, 7]]
    assert grow_class_table(table, "null")[3].tolist() == [6, 7]
    assert grow_class_table(table, 1)[3].tolist() == [2, 3]
    assert grow_class_table(table, [0, 2])[3].tolist() == [2, 3]  # the mean of rows 0 and 2
    assert grow_class_table(table, [1, 2])[3].tolist() == [3, 4]


def test_the_finetuned_model_starts_as_the_base_with_one_more_class(
    class_base: Path, tmp_path: Path
) -> None:
    base = load_stage(LatentDiffusionModule, class_base, "latent_diffusion")
    model = finetuned(class_base, tmp_path, LORA)
    assert model.conditioner.class_names == [*CLASSES, "orange circle"]
    assert "finetune" not in model.hparams
    # old classes and the null class (index 3 -> 4) predict exactly what the base predicts
    assert torch.equal(unet_output(model, [0, 2, 4]), unet_output(base, [0, 2, 3]))


def test_the_loss_is_the_instance_loss_plus_lambda_times_the_prior_loss(
    class_base: Path, tmp_path: Path
) -> None:
    model = finetuned(class_base, tmp_path)
    model.prior_latents = torch.randn(6, 3, 8, 8)
    model.prior_conditions = [0, 1, 2, 0, 1, 2]
    images = batch()
    model.noise_generator = torch.Generator().manual_seed(1)
    loss = model.training_step(images, 0)
    # by hand, with the same draws: t and noise of the instance batch, then the prior picks
    generator = torch.Generator().manual_seed(1)
    z = model.latents(images)
    instance = model.diffusion_loss(z, model.conditioner.encode(torch.full((4,), 3)), generator)
    picks = torch.randint(6, (4,), generator=generator)
    labels = torch.tensor([model.prior_conditions[i] for i in picks])
    prior = model.diffusion_loss(model.prior_latents[picks], model.conditioner.encode(labels),
                                 generator)
    assert torch.allclose(loss, instance + 0.5 * prior)
    assert not torch.allclose(instance, prior)


def test_with_lora_only_the_adapters_and_the_new_class_row_train(
    class_base: Path, tmp_path: Path
) -> None:
    model = finetuned(class_base, tmp_path, LORA, prior={"weight": 0})
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {name for name in trainable if ADAPTER in name}
    assert len(adapters) == 16 and trainable == {*adapters, "unet.label_emb.weight"}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # as conf/model/finetune
    model.noise_generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        optimizer.zero_grad()
        model.training_step(batch(), 0).backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    table, old = model.unet.label_emb.weight, before["unet.label_emb.weight"]
    assert torch.equal(table[[0, 1, 2, 4]], old[[0, 1, 2, 4]]) and not torch.equal(table[3], old[3])


@pytest.mark.parametrize("lora", [LORA, None])
def test_the_new_row_trains_at_embedding_lr_and_the_original_rows_stay(
    class_base: Path, tmp_path: Path, lora: dict | None
) -> None:
    model = finetuned(class_base, tmp_path, lora, embedding_lr=0.5,
                      init_from=["red circle", "blue circle"], prior={"weight": 0})
    table = model.unet.label_emb.weight
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert torch.allclose(table[3], (before["unet.label_emb.weight"][[0, 2]]).mean(0))
    optimizer = model.configure_optimizers()["optimizer"]
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 0.5]
    assert optimizer.param_groups[1]["params"] == [table]
    model.noise_generator = torch.Generator().manual_seed(0)
    model.training_step(batch(), 0).backward()
    optimizer.step()
    # Adam's first step moves every coordinate with a gradient by its group's rate
    step = (table - before["unet.label_emb.weight"]).abs()
    assert torch.allclose(step[3], torch.full_like(step[3], 0.5), atol=1e-3)
    assert step[[0, 1, 2, 4]].max() == 0  # the original classes and the null row stay
    others = [(p - before[name]).abs().max() for name, p in model.named_parameters()
              if name != "unet.label_emb.weight" and p.requires_grad]
    assert others and max(others) < 2e-4  # the base rate (and its weight decay), not 0.5


def test_prior_images_are_sampled_once_and_reused(
    class_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = finetuned(class_base, tmp_path)
    spec = PriorSpec("sha", [0, 1, 2], num=4, guidance_scale=2.0, seed=0, sampling={"steps": 2})
    images, conditions = prior_images(model, spec, tmp_path / "prior")
    assert images.shape == (4, 3, 8, 8) and conditions == [0, 1, 2, 0]
    assert (tmp_path / "prior" / f"prior-{spec.key()}.png").is_file()

    def no_sampling(*args, **kwargs):
        raise AssertionError("the prior images were sampled again")

    monkeypatch.setattr(model, "sample", no_sampling)
    again, _ = prior_images(model, spec, tmp_path / "prior")
    assert torch.equal(again, images)
    other = PriorSpec("sha", [0, 1, 2], num=4, guidance_scale=2.0, seed=1, sampling={})
    assert other.key() != spec.key()


def fit(model: FinetuneModule, root: Path, run: Path, steps: int = 2) -> Path:
    data = InstanceDataModule(str(root), image_size=8, repeats=2, batch_size=2)
    connect(model, data)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, default_root_dir=run,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(run / "last.ckpt")
    return run / "last.ckpt"


def test_a_lora_checkpoint_is_a_plain_ldm_that_samples_and_resumes(
    class_base: Path, tmp_path: Path
) -> None:
    model = finetuned(class_base, tmp_path, LORA)
    ckpt = fit(model, instance_folder(tmp_path / "images"), tmp_path / "run")
    assert len(list((tmp_path / "prior").glob("*.safetensors"))) == 1
    saved = read_checkpoint(ckpt)
    assert not any("parametrizations" in key for key in saved["state_dict"])
    assert len(saved["lora_adapters"]) == 16
    plain = load_stage(LatentDiffusionModule, ckpt, "latent_diffusion")
    labels = [0, 3, 4]
    assert torch.allclose(unet_output(plain, labels), unet_output(model.eval(), labels), atol=1e-5)
    resumed = finetuned(class_base, tmp_path, LORA)
    resumed.on_load_checkpoint(saved)
    resumed.load_state_dict(saved["state_dict"])
    assert torch.allclose(unet_output(resumed.eval(), labels), unet_output(model, labels))

    cfg = compose_config([f"ckpt_path={ckpt}", "per_class=1", "steps=2", "batch_size=4"],
                         tmp_path / "samples", config_name="sample")
    sample_run(cfg)
    assert (tmp_path / "samples" / "samples" / "orange circle").is_dir()


def test_a_text_base_learns_an_identifier_prompt(tmp_path: Path) -> None:
    base = write_base(tmp_path / "text.ckpt", conditioning_config("text", width=16, text=TEXT))
    prompt = "a sks circle on a white background"
    settings = {"new_class": None, "instance_prompt": prompt}
    with pytest.raises(ValueError, match="prior.conditions is empty.*class prompt"):
        fit(finetuned(base, tmp_path, LORA, **settings), instance_folder(tmp_path / "i"),
            tmp_path / "run")
    prior = {"weight": 1.0, "num": 2, "conditions": ["a circle"], "dir": str(tmp_path / "p")}
    model = finetuned(base, tmp_path, LORA, **settings, prior=prior)
    ckpt = fit(model, tmp_path / "i", tmp_path / "run")
    plain = load_stage(LatentDiffusionModule, ckpt, "latent_diffusion")
    assert plain.sample(n=2, prompts=[prompt], steps=2).shape == (2, 3, 8, 8)


def test_bad_bases_and_settings_are_clear_errors(class_base: Path, tmp_path: Path) -> None:
    unconditional = write_base(tmp_path / "uncond.ckpt", None)
    with pytest.raises(ValueError, match="unconditional LDM.*shapes_ldm_class"):
        finetuned(unconditional, tmp_path)
    with pytest.raises(ValueError, match="class-conditional: set model.finetune.new_class"):
        finetuned(class_base, tmp_path, new_class=None, instance_prompt="a sks circle")
    with pytest.raises(ValueError, match="already class 1"):
        finetuned(class_base, tmp_path, new_class="green circle")
    with pytest.raises(ValueError, match="ckpt_path is not set"):
        FinetuneModule(finetune={"new_class": "orange circle"})
    model = finetuned(class_base, tmp_path)
    with pytest.raises(ValueError, match="data.image_size=16.*set data.image_size=8"):
        model.adopt_data(InstanceDataModule(str(tmp_path), image_size=16))
    with pytest.raises(ValueError, match="original classes, not the new one"):
        finetuned(class_base, tmp_path, prior={"weight": 1, "num": 2,
                                               "conditions": ["orange circle"]}).prior_spec()


def test_the_experiment_config_builds_the_module_with_every_setting(
    class_base: Path, tmp_path: Path
) -> None:
    images = instance_folder(tmp_path / "images")
    cfg = compose_config([
        "+experiment=finetune", f"data.root={images}", "data.image_size=8",
        f"model.finetune.ckpt_path={class_base}", "model.finetune.new_class=orange circle",
        "model.finetune.init_from=null", "model.finetune.prior.weight=0.25",
        "model.finetune.prior.num=5", "model.finetune.prior.conditions=[blue circle]",
        "model.finetune.prior.guidance_scale=1.5", "model.finetune.prior.seed=3",
        "model.finetune.lora.rank=3", "model.finetune.lora.alpha=6",
        "model.finetune.lora.target_modules=[qkv]", "model.optimizer.base_lr=0.5",
        "+model.sampling={steps: 2}", "model.num_log_images=3", "model.channels_last=true",
    ], tmp_path)
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(model, FinetuneModule) and model.hparams.optimizer["base_lr"] == 0.5
    assert model.hparams.sampling == {"steps": 2} and model.hparams.num_log_images == 3
    assert model.hparams.channels_last and not model.hparams.compile
    # init_from=null: the new row is the null row
    assert torch.equal(model.unet.label_emb.weight[3], model.unet.label_emb.weight[4])
    adapters = lora_layers(model.unet)
    assert sorted(adapters) == ["input_blocks.3.1.qkv", "middle_block.1.qkv",
                                "output_blocks.0.1.qkv", "output_blocks.1.1.qkv"]
    assert {(a.A.shape[0], a.scaling) for a in adapters.values()} == {(3, 2.0)}
    spec = model.prior_spec()
    assert (spec.conditions, spec.num, spec.guidance_scale, spec.seed) == ([2], 5, 1.5, 3)
    assert model.prior_settings["weight"] == 0.25
    assert model.prior_settings["dir"] == str(tmp_path / "cache" / "prior")


@pytest.mark.parametrize("experiment", ["finetune", "shapes_finetune"])
def test_the_experiment_trains_from_the_command_line_config(
    experiment: str, class_base: Path, tmp_path: Path
) -> None:
    """The user's path: ``python -m ldm_lightning.train +experiment=<experiment>`` on a folder
    of instance images (tests/test_experiment_matrix.py leaves these experiments out: their data
    is the instance folder, not a datamodule of the matrix)."""
    images = instance_folder(tmp_path / "images")
    cfg = compose_config([
        f"+experiment={experiment}", f"data.root={images}", "data.image_size=8",
        "data.batch_size=2", "data.repeats=2", f"model.finetune.ckpt_path={class_base}",
        "model.finetune.new_class=orange circle", "model.finetune.prior.num=4",
        "+model.sampling={steps: 2}", "model.num_log_images=2", "trainer.max_epochs=1",
        "trainer=cpu", "logger=csv",
    ], tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.as_tensor(metrics["val/loss"]))
    saved = read_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert saved["hyper_parameters"]["conditioning"]["class_names"][-1] == "orange circle"
