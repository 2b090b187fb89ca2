"""Export any stage checkpoint to a pickle-free folder:
``python -m ldm_lightning.export ckpt_path=<run>/checkpoints/last.ckpt out=<folder>``.

See :mod:`ldm_lightning.models.exported` for what the folder holds and who reads it.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from ldm_lightning.models.checkpoints import export_stage

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="pkg://conf", config_name="export")
def main(cfg: DictConfig) -> None:
    out = export_stage(cfg.ckpt_path, cfg.out, cfg.trust_checkpoint)
    log.info("Exported %s to %s", cfg.ckpt_path, out)


if __name__ == "__main__":
    main()
