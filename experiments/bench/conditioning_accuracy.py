"""Conditioning accuracy of a shapes LDM: read colour and shape back from generated pixels.

The checker (``ldm_lightning.metrics.shapes_checker``: background from the border, shape
colour from the pixels far from it, shape by the best fit of the dataset's own masks) needs no
learned model.

The checker's accuracy on real renders is measured first (``--calibration``, ~100%). Then the
first stage's ceiling: real renders of every benchmark prompt (random position and size), sent
through the LDM's autoencoder (encode, decode) and read back; the LDM cannot score above what
its decoder can draw. ``--autoencoder <ckpt>`` measures only that, for choosing a first stage
before training an LDM on it. Then each sample is scored against its prompt or label (colour
and shape both right) at every guidance scale; sample grids (one row per prompt, and one grid
per prompt) go to ``--out``.

    python experiments/bench/conditioning_accuracy.py \
        --ckpt <shapes_ldm_text run>/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ldm_lightning.data.shapes import (
    BACKGROUND_COLOURS,
    NUM_CLASSES,
    SHAPE_COLOURS,
    ShapesDataset,
    ShapeSpec,
    describe_label,
    render,
)
from ldm_lightning.metrics.shapes_checker import read_image
from ldm_lightning.models import AutoencoderModule, LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.utils.images import save_grid


def calibrate(image_size: int, count: int) -> dict[str, float]:
    """The checker's accuracy on ``count`` real test-split renders."""
    dataset = ShapesDataset(count, image_size, split="test")
    hits = {"shape": 0, "colour": 0, "background": 0, "both": 0, "shape_iou": 0.0}
    for index in range(count):
        spec = dataset.spec(index)
        read = read_image(dataset[index]["image"])
        hits["shape"] += read["shape"] == spec.shape
        hits["colour"] += read["colour"] == spec.colour
        hits["background"] += read["background"] == spec.background
        hits["both"] += read["shape"] == spec.shape and read["colour"] == spec.colour
        hits["shape_iou"] += read["iou"]
    return {name: value / count for name, value in hits.items()}


def prompt_renders(wanted: list[dict[str, str]], per: int, size: int, seed: int) -> torch.Tensor:
    """``per`` real renders of each target (its shape, colour and background), at random
    positions and sizes drawn as the dataset draws them; ``[len(wanted) * per, 3, size, size]``."""
    rng = torch.Generator().manual_seed(seed)
    images = []
    for target in wanted:
        for _ in range(per):
            radius = 0.2 + 0.18 * torch.rand((), generator=rng).item()
            cx, cy = (radius + (1 - 2 * radius) * torch.rand(2, generator=rng)).tolist()
            spec = ShapeSpec(target["shape"], target["colour"], target["background"], cx, cy,
                             radius)
            images.append(render(spec, size))
    return torch.stack(images)


def first_stage_ceiling(
    autoencoder: torch.nn.Module, wanted: list[dict[str, str]], per: int, size: int, seed: int
) -> dict[str, float]:
    """The checker's scores on autoencoder reconstructions of real renders of each target."""
    images = prompt_renders(wanted, per, size, seed)
    device = next((p.device for p in autoencoder.parameters()), torch.device("cpu"))
    reconstructions = torch.cat([autoencoder.decode(autoencoder.encode(chunk.to(device)))
                                 .clamp(-1, 1).cpu() for chunk in images.split(64)])
    return score(reconstructions, wanted, per)


def targets(kind: str) -> tuple[list[dict[str, str]], dict[str, list]]:
    """One target per class (shape x colour) and the ``sample`` arguments that ask for them."""
    wanted = [dict(zip(("shape", "colour"), describe_label(i), strict=True))
              for i in range(NUM_CLASSES)]
    if kind == "class":
        return wanted, {"labels": list(range(NUM_CLASSES))}
    backgrounds = [b for b in BACKGROUND_COLOURS if b not in SHAPE_COLOURS] or list(
        BACKGROUND_COLOURS
    )
    prompts = []
    for index, target in enumerate(wanted):
        target["background"] = backgrounds[index % len(backgrounds)]
        prompts.append(f"a {target['colour']} {target['shape']} on a {target['background']} "
                       "background")
    return wanted, {"prompts": prompts}


def score(images: torch.Tensor, wanted: list[dict[str, str]], per: int) -> dict[str, float]:
    """Fractions of samples whose shape, colour, both (and background) match their target, and
    the mean ``shape_iou`` of the read shapes (how clean they are, right or wrong)."""
    hits = {"shape": 0, "colour": 0, "both": 0, "background": 0, "shape_iou": 0.0}
    for index, image in enumerate(images):
        target, read = wanted[index // per], read_image(image)
        hits["shape"] += read["shape"] == target["shape"]
        hits["colour"] += read["colour"] == target["colour"]
        hits["both"] += read["shape"] == target["shape"] and read["colour"] == target["colour"]
        hits["background"] += read["background"] == target.get("background")
        hits["shape_iou"] += read["iou"]
    result = {name: value / len(images) for name, value in hits.items()}
    if "background" not in wanted[0]:
        del result["background"]
    return result


def shape_quality(ldm: LatentDiffusionModule, args: argparse.Namespace) -> dict[str, float]:
    """For an unconditional model there is no target: how clean its shapes are. Mean shape IoU
    of ``18 * per_prompt`` samples and the share above 0.8 (a clean, recognisable shape)."""
    images = ldm.sample(n=18 * args.per_prompt, sampler=args.sampler, steps=args.steps,
                        timestep_spacing=args.timestep_spacing,
                        seed=args.seed).cpu()
    ious = torch.tensor([read_image(image)["iou"] for image in images])
    return {"samples": len(ious), "shape_iou": ious.mean().item(),
            "share_iou_above_0.8": (ious > 0.8).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path,
                        help="a shapes LDM checkpoint (class, text, or unconditional: shape IoU)")
    parser.add_argument("--autoencoder", type=Path,
                        help="only the first-stage ceiling of this shapes autoencoder checkpoint")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="guidance rescale phi (Lin et al. 2024); 0: plain guidance")
    parser.add_argument("--per-prompt", type=int, default=8, help="samples per prompt/label")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--timestep-spacing",
                        help="one of the checkpoint's process's spacings (ddpm: leading, "
                             "trailing, linspace, karras); default: its model.sampling")
    parser.add_argument("--calibration", type=int, default=1000, help="real renders to check")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/conditioning"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to sample (cpu, cuda)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)

    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    image_size = 32
    ldm = None
    if args.ckpt is not None:
        ldm = load_stage(LatentDiffusionModule, args.ckpt, "latent_diffusion").to(args.device)
        image_size = ldm.hparams.image_size
    report["checker_on_real_renders"] = calibrate(image_size, args.calibration)
    print(f"checker on {args.calibration} real {image_size}px renders:",
          report["checker_on_real_renders"])
    if args.autoencoder is not None:
        autoencoder = load_stage(AutoencoderModule, args.autoencoder, "autoencoder")
        autoencoder.to(args.device)
        wanted, _ = targets("text")
        ceiling = first_stage_ceiling(autoencoder, wanted, args.per_prompt, image_size, args.seed)
        report["first_stage_ceiling"] = ceiling
        print("first-stage ceiling (reconstructed renders of the text prompts):", ceiling)
    if ldm is None:
        (args.out / "accuracy.json").write_text(json.dumps(report, indent=2))
        return

    # What the samples are conditioned on: "class" (labels) or "text" (prompts, any text encoder).
    kind = ldm.conditioner.condition if ldm.conditioner.is_conditional else "none"
    if kind == "none":
        report["unconditional"] = shape_quality(ldm, args)
        print("unconditional samples:", report["unconditional"])
        (args.out / "accuracy.json").write_text(json.dumps(report, indent=2))
        return
    wanted, condition = targets(kind)
    # The text prompts name the same 18 shape x colour targets, each with a background.
    report["first_stage_ceiling"] = first_stage_ceiling(
        ldm.first_stage, targets("text")[0], args.per_prompt, image_size, args.seed
    )
    print("first-stage ceiling (reconstructed renders of the text prompts):",
          report["first_stage_ceiling"])
    n = len(wanted) * args.per_prompt
    report["kind"], report["targets"] = kind, condition
    print(f"| guidance | shape+colour | shape | colour |{' background |' if kind == 'text' else ''}"
          " shape IoU | seconds |")
    best = None
    for scale in args.guidance:
        start = time.perf_counter()
        images = ldm.sample(n=n, sampler=args.sampler, steps=args.steps, guidance_scale=scale,
                            timestep_spacing=args.timestep_spacing,
                            guidance_rescale=args.guidance_rescale, seed=args.seed,
                            **condition).cpu()
        seconds = time.perf_counter() - start
        result = {**score(images, wanted, args.per_prompt), "seconds": round(seconds, 1)}
        report[f"guidance_{scale:g}"] = result
        save_grid(images, args.out / f"{kind}_guidance{scale:g}.png", nrow=args.per_prompt)
        cells = " | ".join(f"{result[k]:.1%}" for k in ("both", "shape", "colour"))
        extra = f" {result['background']:.1%} |" if kind == "text" else ""
        print(f"| {scale:g} | {cells} |{extra} {result['shape_iou']:.3f} | {seconds:.0f} |")
        if best is None or result["both"] > best[1]["both"]:
            best = (scale, result, images)
    scale, _, images = best
    for index, target in enumerate(wanted):
        name = f"{target['colour']}_{target['shape']}"
        rows = images[index * args.per_prompt:(index + 1) * args.per_prompt]
        save_grid(rows, args.out / "per_prompt" / f"{name}_guidance{scale:g}.png",
                  nrow=args.per_prompt)
    report["best_guidance"] = scale
    (args.out / "accuracy.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}/accuracy.json and sample grids")


if __name__ == "__main__":
    main()
