"""No checkpoint runs code on load; every stage round-trips through its export folder.

A "poisoned" checkpoint is a real checkpoint of this package with one extra entry whose pickle
calls ``os.system("touch <marker>")``. Every load path must refuse it before the pickle runs
(the marker never appears) and say what it found and what to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm_lightning.evaluate import evaluate
from ldm_lightning.models import AutoencoderModule, ConditionerModule, LatentDiffusionModule
from ldm_lightning.models.checkpoints import export_stage, load_stage, read_checkpoint
from ldm_lightning.models.conditioning import TextConditioning
from ldm_lightning.models.exported import CONFIG_FILE, RUN_CONFIG_FILE, WEIGHTS_FILE, write_export
from ldm_lightning.models.first_stage import build_first_stage
from ldm_lightning.sample import run as sample_run
from ldm_lightning.train import train
from ldm_lightning.utils.hashing import file_sha256
from ldm_lightning.utils.safe_load import UnsafeCheckpointError
from tests.hydra_utils import TINY_AUTOENCODER, compose_config
from tests.models.test_diffusion_module import train_channel_ldm
from tests.test_conditioning_train import TINY_CLIP, TINY_DATA, TINY_LDM
from tests.test_evaluate import eval_config

REPO = Path(__file__).parents[2]


class RunsCommand:
    """Unpickling this calls ``os.system(command)``: what a malicious checkpoint does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints of every stage: VQ autoencoder, text conditioner, text LDM with EMA."""
    root = tmp_path_factory.mktemp("stages")
    train(compose_config(["+experiment=shapes_vq", *TINY_AUTOENCODER, "test=false"], root / "ae"))
    ae = root / "ae" / "checkpoints" / "last.ckpt"
    train(compose_config(["+experiment=shapes_clip", *TINY_DATA, *TINY_CLIP,
                          f"model.first_stage.ckpt_path={ae}"], root / "clip"))
    clip = root / "clip" / "checkpoints" / "last.ckpt"
    train(compose_config(["+experiment=shapes_ldm_text", *TINY_DATA, *TINY_LDM,
                          f"model.first_stage.ckpt_path={ae}",
                          f"model.conditioning.text_ckpt_path={clip}"], root / "ldm"))
    return {"ae": ae, "clip": clip, "ldm": root / "ldm" / "checkpoints" / "last.ckpt"}


def poisoned(source: Path, folder: Path) -> tuple[Path, Path]:
    """A copy of ``source`` whose pickle would create ``<folder>/marker``; (copy, marker)."""
    marker = folder / "marker"
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["note"] = RunsCommand(f"touch {marker}")
    path = folder / f"poisoned-{source.parents[1].name}.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def assert_refused(error: pytest.ExceptionInfo, marker: Path) -> None:
    message = str(error.value)
    assert "posix.system" in message and "trust_checkpoint=true" in message
    assert "ldm_lightning.export" in message
    assert not marker.exists()


@pytest.mark.parametrize("stage", ["ae", "clip", "ldm"])
def test_every_checkpoint_written_loads_with_weights_only(stages, stage) -> None:
    checkpoint = torch.load(stages[stage], weights_only=True)
    assert checkpoint["state_dict"] and checkpoint["optimizer_states"]
    if stage == "ldm":  # the EMA callback's state is in it too
        assert "current_model_state" in checkpoint and checkpoint["scale_factor"] > 0


def test_sample_refuses_a_poisoned_checkpoint(stages, tmp_path) -> None:
    path, marker = poisoned(stages["ldm"], tmp_path)
    cfg = compose_config([f"ckpt_path={path}", "num_samples=1", "steps=2", "device=cpu"],
                         tmp_path / "out", config_name="sample")
    with pytest.raises(UnsafeCheckpointError) as error:
        sample_run(cfg)
    assert_refused(error, marker)
    assert not (tmp_path / "out" / "grid.png").exists()


def test_evaluate_refuses_a_poisoned_checkpoint(stages, tmp_path) -> None:
    path, marker = poisoned(stages["ae"], tmp_path)
    with pytest.raises(UnsafeCheckpointError) as error:
        evaluate(eval_config(tmp_path / "out", path))
    assert_refused(error, marker)


def test_first_stage_and_text_encoder_refuse_poisoned_checkpoints(stages, tmp_path) -> None:
    path, marker = poisoned(stages["ae"], tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="model.first_stage.ckpt_path") as error:
        build_first_stage(ckpt_path=str(path))
    assert_refused(error, marker)
    path, marker = poisoned(stages["clip"], tmp_path)
    with pytest.raises(UnsafeCheckpointError, match="model.conditioning.text_ckpt_path") as error:
        TextConditioning(text_ckpt_path=str(path))
    assert_refused(error, marker)


def test_resume_refuses_a_poisoned_checkpoint(stages, tmp_path) -> None:
    path, marker = poisoned(stages["ae"], tmp_path)
    cfg = compose_config(["+experiment=shapes_vq", *TINY_AUTOENCODER, "test=false",
                          f"ckpt_path={path}"], tmp_path / "run")
    with pytest.raises(UnsafeCheckpointError) as error:
        train(cfg)
    assert_refused(error, marker)


def test_compvis_loader_and_export_refuse_poisoned_checkpoints(stages, tmp_path) -> None:
    path, marker = poisoned(stages["ae"], tmp_path)
    with pytest.raises(UnsafeCheckpointError) as error:
        AutoencoderModule.from_compvis_checkpoint(path)
    assert_refused(error, marker)
    with pytest.raises(UnsafeCheckpointError) as error:
        export_stage(path, tmp_path / "export")
    assert_refused(error, marker)
    assert not (tmp_path / "export").exists()


def test_trust_checkpoint_is_an_explicit_opt_in_that_warns(stages, tmp_path, caplog) -> None:
    """A foreign but harmless global loads only with trust; trust really runs the pickle."""
    checkpoint = torch.load(stages["ae"], weights_only=True)
    checkpoint["ratio"] = Fraction(1, 3)
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    with pytest.raises(UnsafeCheckpointError, match="fractions.Fraction"):
        read_checkpoint(foreign)
    assert read_checkpoint(foreign, trust=True)["ratio"] == Fraction(1, 3)
    assert "may run any code" in caplog.text

    path, marker = poisoned(stages["ae"], tmp_path)
    read_checkpoint(path, trust=True)
    assert marker.exists()  # what the refusal protects against


def test_export_writes_safetensors_and_json_config(stages, tmp_path) -> None:
    out = export_stage(stages["ldm"], tmp_path / "ldm")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["entries"]["ldm_lightning_kind"] == "latent_diffusion"
    assert config["entries"]["scale_factor"] > 0 and config["weights"] == "ema"
    assert config["hyper_parameters"]["first_stage"]["hparams"]["regularizer"] == "vq"
    assert config["source"]["sha256"] and config["source"]["global_step"] > 0
    tokenizer = config["extra_state"]["conditioner.text._extra_state"]["tokenizer"]
    assert json.loads(tokenizer)  # the learned BPE tokenizer, as JSON text
    tensors = load_file(out / WEIGHTS_FILE)
    checkpoint = torch.load(stages["ldm"], weights_only=True)
    for name, value in checkpoint["state_dict"].items():  # the EMA weights ...
        if torch.is_tensor(value):
            torch.testing.assert_close(tensors[name], value, rtol=0, atol=0)
    for name, value in checkpoint["current_model_state"].items():  # ... and the trained ones
        if torch.is_tensor(value):
            torch.testing.assert_close(tensors[f"training/{name}"], value, rtol=0, atol=0)
    run_config = stages["ldm"].parents[1] / "config.yaml"
    assert (out / RUN_CONFIG_FILE).read_text() == run_config.read_text()


def test_samples_from_the_export_equal_samples_from_the_checkpoint(stages, tmp_path) -> None:
    out = export_stage(stages["ldm"], tmp_path / "ldm")
    images = []
    for source, run_dir in ((stages["ldm"], "a"), (out, "b")):
        cfg = compose_config([f"ckpt_path={source}", "num_samples=3", "batch_size=2", "steps=3",
                              "guidance_scale=2.0", "prompts=[a red circle on a gray background]",
                              "device=cpu"], tmp_path / run_dir, config_name="sample")
        sample_run(cfg)
        images.append((tmp_path / run_dir / "grid.png").read_bytes())
    assert images[0] == images[1]


def test_first_stage_and_text_encoder_from_exports_equal_the_checkpoints(stages, tmp_path):
    ae_export = export_stage(stages["ae"], tmp_path / "ae")
    from_ckpt, record = build_first_stage(ckpt_path=str(stages["ae"]))
    from_export, export_record = build_first_stage(ckpt_path=str(ae_export))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(from_export.encode(x), from_ckpt.encode(x), rtol=0, atol=0)
    assert export_record["hparams"] == record["hparams"]

    clip_export = export_stage(stages["clip"], tmp_path / "clip")
    captions = ["a red circle on a gray background", "a blue square on a white background"]
    encoders = [TextConditioning(text_ckpt_path=str(p)).text.eval()
                for p in (stages["clip"], clip_export)]
    with torch.no_grad():
        (tokens_a, pooled_a), (tokens_b, pooled_b) = (e(captions) for e in encoders)
    torch.testing.assert_close(tokens_b, tokens_a, rtol=0, atol=0)
    torch.testing.assert_close(pooled_b, pooled_a, rtol=0, atol=0)
    # Every stage kind loads back as its module.
    assert isinstance(load_stage(ConditionerModule, clip_export, "conditioner"), ConditionerModule)
    assert isinstance(load_stage(AutoencoderModule, ae_export, "autoencoder"), AutoencoderModule)


def test_evaluate_from_the_export_equals_evaluate_from_the_checkpoint(stages, tmp_path) -> None:
    out = export_stage(stages["ae"], tmp_path / "ae")
    reports = [evaluate(eval_config(tmp_path / name, source, "lpips=null"))
               for name, source in (("a", stages["ae"]), ("b", out))]
    assert reports[1]["metrics"] == reports[0]["metrics"]
    assert reports[1]["data_config"] == str(out.resolve() / RUN_CONFIG_FILE)


def test_an_ldm_builds_on_an_exported_first_stage(stages, tmp_path) -> None:
    """The same frozen weights as from the .ckpt; the record hashes the exported weights."""
    out = export_stage(stages["ae"], tmp_path / "ae")
    unet = {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
            "attention_resolutions": [2], "num_head_channels": 8}
    models = [LatentDiffusionModule(unet=unet, first_stage={"ckpt_path": str(p)}, image_size=16,
                                    scale_factor=1.0) for p in (stages["ae"], out)]
    expected = models[0].first_stage.state_dict()
    for name, value in models[1].first_stage.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    assert models[1].hparams.first_stage["sha256"] == file_sha256(out / WEIGHTS_FILE)


def test_a_channel_normalised_ldm_round_trips_through_its_export(tmp_path) -> None:
    """The per-channel mean and std travel in config.json's entries, as scale_factor does."""
    model, _, ckpt = train_channel_ldm(tmp_path)
    out = export_stage(ckpt, tmp_path / "ldm")
    entries = json.loads((out / CONFIG_FILE).read_text())["entries"]
    assert entries["latent_norm"] == "channel" and entries["scale_factor"] is None
    assert entries["latent_mean"] == model.latent_norm.mean
    assert entries["latent_std"] == model.latent_norm.std
    exported = LatentDiffusionModule.load_from_checkpoint(out)
    assert exported.latent_norm.state() == model.latent_norm.state()
    from_ckpt = LatentDiffusionModule.load_from_checkpoint(ckpt)
    torch.testing.assert_close(exported.sample(n=2, seed=0), from_ckpt.sample(n=2, seed=0),
                               rtol=0, atol=0)


def test_a_folder_that_is_not_an_export_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="ldm_lightning.export"):
        read_checkpoint(tmp_path, "model.first_stage.ckpt_path")


def test_public_load_from_checkpoint_is_safe_and_takes_exports(stages, tmp_path) -> None:
    path, marker = poisoned(stages["ldm"], tmp_path)
    with pytest.raises(UnsafeCheckpointError) as error:
        LatentDiffusionModule.load_from_checkpoint(path)
    assert_refused(error, marker)
    with pytest.raises(ValueError, match="is a latent_diffusion checkpoint, but an autoencoder"):
        AutoencoderModule.load_from_checkpoint(stages["ldm"])
    out = export_stage(stages["ldm"], tmp_path / "ldm")
    from_ckpt = LatentDiffusionModule.load_from_checkpoint(stages["ldm"])
    from_export = LatentDiffusionModule.load_from_checkpoint(out)
    prompts = ["a red circle on a gray background"]
    torch.testing.assert_close(from_export.sample(n=2, steps=3, prompts=prompts, seed=3),
                               from_ckpt.sample(n=2, steps=3, prompts=prompts, seed=3),
                               rtol=0, atol=0)


def test_export_command_line(stages, tmp_path) -> None:
    out = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, "-m", "ldm_lightning.export", f"ckpt_path={stages['ae']}", f"out={out}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE, RUN_CONFIG_FILE]
    assert json.loads((out / CONFIG_FILE).read_text())["entries"]["ldm_lightning_kind"] == (
        "autoencoder"
    )


def test_an_export_of_another_format_or_a_non_json_entry_is_a_clear_error(stages, tmp_path):
    out = export_stage(stages["ae"], tmp_path / "ae")
    config = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(ValueError, match="export the checkpoint again"):
        read_checkpoint(out, "model.first_stage.ckpt_path")

    checkpoint = torch.load(stages["ae"], weights_only=True)
    checkpoint["hyper_parameters"]["weights"] = torch.zeros(2)  # not JSON
    with pytest.raises(ValueError, match="JSON cannot store"):
        write_export(checkpoint, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing written
