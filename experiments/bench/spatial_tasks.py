"""Score a shapes model with a spatial condition on held-back shapes (the test split) and write
a grid: inpainting (kept/filled-region PSNR), super-resolution x4 (PSNR/SSIM against bicubic)
or semantic synthesis (IoU of the generated shape with the map).

One sample per test image, batch ``b`` with seed ``b``. PSNR is ``10 log10(1 / MSE)`` of
[0, 1] pixels pooled over the region (all images); SSIM is torchmetrics' (Wang et al. 2004).
Each report also gives the autoencoder's own reconstruction ``D(E(x))`` on the same images:
what the model could reach through its first stage.

    python experiments/bench/spatial_tasks.py inpaint <ckpt> --out experiments/results/inpaint
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from ldm_lightning.data.masks import random_masks
from ldm_lightning.data.shapes import ShapesDataset
from ldm_lightning.metrics.shapes_checker import coverage, read_image
from ldm_lightning.models import LatentDiffusionModule
from ldm_lightning.models.checkpoints import load_stage
from ldm_lightning.models.spatial import downsample
from ldm_lightning.utils.images import save_grid


def unit(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(-1, 1) + 1) / 2


def psnr(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """PSNR of [-1, 1] images over the pixels where ``weight`` [B, 1, H, W] is 1 (all: None)."""
    error = (unit(a) - unit(b)) ** 2
    weight = torch.ones_like(error[:, :1]) if weight is None else weight
    mse = (error * weight).sum() / (weight.sum() * error.shape[1])
    return 10 * math.log10(1 / mse.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=("inpaint", "upscale", "semantic"))
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--num", type=int, default=128, help="test images")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="null: the checkpoint's")
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_stage(LatentDiffusionModule, args.ckpt, "latent_diffusion").eval()
    size = model.hparams.image_size
    loader = DataLoader(ShapesDataset(args.num, size, split="test"), batch_size=args.batch)
    truth, outputs, inputs = [], [], []
    for index, batch in enumerate(loader):
        x = batch["image"]
        if args.task == "inpaint":
            masks = random_masks(len(x), size, torch.Generator().manual_seed(index))
            spatial = {"image": x, "mask": masks}
        elif args.task == "upscale":
            spatial = {"image": downsample(x, model.spatial.factor)}
        else:
            spatial = {"segmentation": batch["segmentation"]}
        out = model.sample(n=len(x), seed=index, steps=args.steps, sampler=args.sampler,
                           spatial=spatial)
        truth.append(x)
        outputs.append(out)
        inputs.append(spatial)
    x, out = torch.cat(truth), torch.cat(outputs)
    given = {k: torch.cat([i[k] for i in inputs]) for k in inputs[0]}
    with torch.no_grad():
        recon = model.decode(model.latents({"image": x}))
    report: dict[str, float | int | str] = {"task": args.task, "ckpt": str(args.ckpt),
                                            "images": len(x), "steps": args.steps or "ckpt"}
    rows = 8
    if args.task == "inpaint":
        mask = given["mask"]
        report.update(
            kept_psnr=psnr(out, x, 1 - mask), filled_psnr=psnr(out, x, mask),
            autoencoder_kept_psnr=psnr(recon, x, 1 - mask),
            autoencoder_filled_psnr=psnr(recon, x, mask),
            gray_fill_filled_psnr=psnr(torch.zeros_like(x), x, mask),
            masked_share=mask.mean().item(),
        )
        pasted = x * (1 - mask) + out * mask
        grid = [x[:rows], x[:rows] * (1 - mask[:rows]) + mask[:rows], out[:rows], pasted[:rows]]
    elif args.task == "upscale":
        low = given["image"]
        bicubic = F.interpolate(low, size=size, mode="bicubic").clamp(-1, 1)
        for name, image in (("", out), ("bicubic_", bicubic), ("autoencoder_", recon)):
            report[f"{name}psnr"] = psnr(image, x)
            report[f"{name}ssim"] = ssim(unit(image), unit(x), data_range=1.0).item()
        nearest = F.interpolate(low, size=size, mode="nearest")
        grid = [nearest[:rows], bicubic[:rows], out[:rows], x[:rows]]
    else:
        shape = given["segmentation"] > 0
        ious, ious_recon = [], []
        for image, reference, target in zip(out, recon, shape):
            for store, picture in ((ious, image), (ious_recon, reference)):
                found = coverage(picture)[0] > 0.5
                store.append(((found & target).sum() / (found | target).sum()).item())
        report.update(
            map_iou=sum(ious) / len(ious), autoencoder_map_iou=sum(ious_recon) / len(ious_recon),
            clean=sum(read_image(image)["iou"] > 0.8 for image in out) / len(out),
        )
        maps = shape[:rows, None].float().expand(-1, 3, -1, -1) * 2 - 1
        grid = [maps, out[:rows], x[:rows]]
    args.out.mkdir(parents=True, exist_ok=True)
    save_grid(torch.cat(grid), args.out / "grid.png", nrow=rows)
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
