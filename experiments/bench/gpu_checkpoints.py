"""The checkpoint paths of a GPU run: SIGKILL + resume, export, and a GPU checkpoint on the CPU.

On a CUDA machine (``trainer=gpu``: bf16-mixed), with the tiny configs of
``tests/test_kill_resume.py``:

1. the autoencoder (two optimizers) and the LDM (EMA) are SIGKILLed twice mid-epoch and resumed
   from ``last.ckpt``; the final step counts must equal an uninterrupted GPU run's;
2. the LDM is exported; samples on the GPU from the ``.ckpt`` and from the export must be equal;
3. the GPU checkpoint, its export and the GPU samples are written to ``<out>/for_cpu`` so that
   a CPU-only machine can check it loads them (``--check-on-cpu <out>/for_cpu``).

    PYTHONPATH=. python experiments/bench/gpu_checkpoints.py --out <dir>            # GPU machine
    PYTHONPATH=. python experiments/bench/gpu_checkpoints.py --check-on-cpu <dir>/for_cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import export_stage
from tests.test_kill_resume import (
    AUTOENCODER,
    DIFFUSION,
    kill_twice_and_resume,
    load_last,
    run_cli,
    step_counts,
)

SAMPLING = {"n": 8, "steps": 20, "seed": 0}


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def killed_vs_uninterrupted(work: Path, name: str, overrides: list[str], every_n: int,
                            kill_at: tuple[int, int]) -> dict:
    """Step counts of an uninterrupted run and of one SIGKILLed twice and resumed."""
    run_cli(work / f"{name}_reference", overrides, killed=False)
    reference = step_counts(load_last(work / f"{name}_reference"))
    resumed = step_counts(kill_twice_and_resume(work / f"{name}_killed", overrides, every_n,
                                                kill_at=kill_at))
    result = {"uninterrupted": reference, "killed_twice_resumed": resumed,
              "equal": reference == resumed}
    log(name, result)
    return result


def on_gpu(out: Path) -> dict:
    work = Path(tempfile.mkdtemp())
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    gpu = ["trainer=gpu"]
    report["autoencoder"] = killed_vs_uninterrupted(work, "ae", [*AUTOENCODER, *gpu], 3, (12, 20))
    ae_ckpt = work / "ae_reference" / "checkpoints" / "last.ckpt"
    ldm = [*DIFFUSION, *gpu, f"model.first_stage.ckpt_path={ae_ckpt}"]
    report["ldm"] = killed_vs_uninterrupted(work, "ldm", ldm, 2, (7, 11))

    ckpt = work / "ldm_reference" / "checkpoints" / "last.ckpt"
    for_cpu = out / "for_cpu"
    export = export_stage(ckpt, for_cpu / "export")
    samples = [LatentDiffusionModule.load_from_checkpoint(source, map_location="cuda")
               .sample(**SAMPLING).cpu() for source in (ckpt, export)]
    report["export_samples_equal_on_gpu"] = bool(torch.equal(samples[0], samples[1]))
    log("samples from the .ckpt and its export are equal:", report["export_samples_equal_on_gpu"])
    shutil.copyfile(ckpt, for_cpu / "last.ckpt")
    torch.save(samples[0], for_cpu / "gpu_samples.pt")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def on_cpu(folder: Path) -> dict:
    gpu_samples = torch.load(folder / "gpu_samples.pt", weights_only=True)
    report = {}
    for name in ("last.ckpt", "export"):
        model = LatentDiffusionModule.load_from_checkpoint(folder / name)
        difference = (model.sample(**SAMPLING) - gpu_samples).abs()
        report[name] = {"max_abs_difference_vs_gpu": difference.max().item(),
                        "mean_abs_difference_vs_gpu": difference.mean().item()}
        log(name, "on the CPU vs the GPU samples:", report[name])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="where the GPU run writes its report")
    parser.add_argument("--check-on-cpu", type=Path, help="a for_cpu folder from a GPU run")
    args = parser.parse_args()
    if args.check_on_cpu is not None:
        on_cpu(args.check_on_cpu)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        on_gpu(args.out)


if __name__ == "__main__":
    main()
