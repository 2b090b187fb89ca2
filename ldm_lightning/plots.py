"""PNG curves of a run's logged metrics: ``python -m ldm_lightning.plots <run_dir> [--out DIR]``.

Reads ``<run_dir>/csv/metrics.csv`` (written with ``logger=csv`` or ``logger=many``) and draws
one figure per quantity, its train, val and test series together (see
:mod:`ldm_lightning.utils.curves`), into ``<run_dir>/plots`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm_lightning.utils.curves import plot_run


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (with csv/metrics.csv)")
    parser.add_argument("--out", default=None, help="output folder (default: <run_dir>/plots)")
    args = parser.parse_args(argv)
    paths = plot_run(args.run_dir, args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
