"""Noise processes compared at equal training on the class-conditional shapes LDM.

Each variant is the demo's class LDM (``+experiment=shapes_demo_ldm``: cosine rate to 0.1x,
EMA 0.995, guidance dropout 10%) under one noise process, trained for the same batches on the
same autoencoder:

- ``ddpm_eps``: DDPM, eps-prediction, uniform weight (L_simple, DDPM eq. 14);
- ``ddpm_v``: DDPM, v-prediction, min-SNR-5 (the demo's recipe before this comparison);
- ``ddpm_v_zts``: ``ddpm_v`` on the zero-terminal-SNR schedule (Lin et al. 2024, Alg. 1);
- ``flow``: rectified flow with logit-normal t (``model/process=flow``; SD3; the demo's since);
- ``edm``: EDM preconditioning and log-normal sigma (``model/process=edm``; Karras et al. 2022).

The same backbone and batches cost the same for every process, so equal batches are equal
training time (the wall times are printed). Each model then draws 8 samples of each of the 18
classes (guidance 3) with each sampler at about 10, 20 and 50 model evaluations (Heun: n steps
are 2n - 1 evaluations), scored by the conditioning benchmark's checker
(``score_samples.score_folder``): the share of clean shapes (IoU > 0.8), of the right shape and
colour, and the mean shape IoU.

    python experiments/bench/process_comparison.py --autoencoder <shapes_kl ckpt> \\
        --out experiments/results/process_comparison
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_samples import score_folder  # noqa: E402

from ldm_lightning.models import LatentDiffusionModule  # noqa: E402
from ldm_lightning.models.checkpoints import load_stage  # noqa: E402
from ldm_lightning.sampling import (  # noqa: E402
    batch_conditions,
    generate,
    per_class_labels,
    write_samples,
)

DDPM_V = ["model/process=ddpm", "model.prediction=v", "model.loss_weighting=min_snr"]
VARIANTS = {
    "ddpm_eps": ["model/process=ddpm", "model.prediction=eps", "model.loss_weighting=uniform"],
    "ddpm_v": DDPM_V,
    "ddpm_v_zts": [*DDPM_V, "model.schedule.zero_terminal_snr=true"],
    "flow": ["model/process=flow"],
    "edm": ["model/process=edm"],
}
SAMPLERS = ("ddim", "dpmpp_2m", "heun", "euler_ancestral")
BUDGETS = (10, 20, 50)  # model evaluations per sample (per branch of the guidance batch)


def steps_for(sampler: str, evaluations: int) -> int:
    """Steps giving about ``evaluations`` model calls: Heun's n steps call it 2n - 1 times."""
    return (evaluations + 1) // 2 if sampler == "heun" else evaluations


def train(name: str, args: argparse.Namespace) -> tuple[Path, float]:
    run_dir = args.out / "runs" / name
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if ckpt.exists():
        return ckpt, float("nan")
    command = [
        sys.executable, "-m", "ldm_lightning.train", "+experiment=shapes_demo_ldm",
        f"hydra.run.dir={run_dir}", f"trainer.max_epochs={args.epochs}",
        f"model.first_stage.ckpt_path={args.autoencoder}", f"seed={args.seed}",
        *VARIANTS[name],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    with open(args.out / f"train_{name}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return ckpt, time.perf_counter() - start


def evaluate(name: str, ckpt: Path, args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    model = load_stage(LatentDiffusionModule, ckpt, "latent_diffusion")
    labels, folders = per_class_labels(model, args.per_class)
    rows = []
    for sampler in SAMPLERS:
        for budget in BUDGETS:
            steps = steps_for(sampler, budget)
            out = args.out / "samples" / name / f"{sampler}_{budget}"
            start = time.perf_counter()
            batches = generate(model, len(labels), 48, batch_conditions(len(labels), 48, labels),
                               seed=args.seed, sampler=sampler, steps=steps,
                               guidance_scale=args.guidance)
            images = torch.cat(list(batches))
            seconds = time.perf_counter() - start
            write_samples(images, out, args.per_class, folders)
            row = {"variant": name, "sampler": sampler, "steps": steps,
                   "evaluations": 2 * steps - 1 if sampler == "heun" else steps,
                   "sampling_s": round(seconds, 1), **score_folder(out)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--autoencoder", type=Path, required=True, help="shapes KL checkpoint")
    parser.add_argument("--epochs", type=int, default=12, help="LDM epochs of each variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/process_comparison"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(sys.argv)}\nload: {os.getloadavg()}", flush=True)

    def one(name: str) -> list[dict]:
        ckpt, seconds = train(name, args)
        print(json.dumps({"variant": name, "training_s": round(seconds, 1)}), flush=True)
        return [{**row, "training_s": round(seconds, 1)} for row in evaluate(name, ckpt, args)]

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = [row for result in pool.map(one, args.variants) for row in result]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"load: {os.getloadavg()}")
    print("| variant | sampler | evaluations | clean | right class | shape IoU | sampling s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['variant']} | {row['sampler']} | {row['evaluations']} | "
              f"{row['clean']:.1%} | {row['shape_and_colour']:.1%} | {row['shape_iou']:.3f} | "
              f"{row['sampling_s']} |")


if __name__ == "__main__":
    main()
