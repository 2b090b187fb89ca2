"""Curves of a run's logged metrics: one PNG per quantity, its train, val and test series together.

Reads Lightning's CSVLogger ``metrics.csv`` (one row per logging call, empty cells for metrics
not logged in it): ``train/loss_step``, ``train/loss_epoch`` and ``val/loss`` all land in
``loss.png``; ``val/fid`` in ``fid.png``; ``lr-AdamW`` in ``lr-AdamW.png``. The x axis is the
global step. :func:`plot_lines` draws any such labelled lines into one PNG (the comparison
report's quality-vs-time curves too), written through the atomic-write helper.
"""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ldm_lightning.utils.atomic import atomic_write

__all__ = ["plot_lines", "plot_run", "quantity", "read_metrics"]

Series = dict[str, list[tuple[int, float]]]
_STAGE = re.compile(r"^(train|val|test)/")
_REDUCTION = re.compile(r"_(step|epoch)$")


def quantity(column: str) -> str:
    """The plotted quantity of a metric column: stage prefix and step/epoch suffix removed."""
    return _REDUCTION.sub("", _STAGE.sub("", column)).replace("/", "_")


def read_metrics(path: str | Path) -> dict[str, Series]:
    """``{quantity: {column: [(step, value), ...]}}`` from a CSVLogger ``metrics.csv``.

    Empty and non-finite cells are skipped; rows without a step are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: plots read the CSVLogger's metrics.csv; train with "
            "logger=csv (or logger=many) so the run directory has csv/metrics.csv."
        )
    curves: dict[str, Series] = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                raise ValueError(f"{path} has a row without a step: {row}")
            step = int(float(row["step"]))
            for column, cell in row.items():
                if column in ("step", "epoch") or not cell:
                    continue
                value = float(cell)
                if math.isfinite(value):
                    curves[quantity(column)][column].append((step, value))
    return {name: dict(series) for name, series in curves.items()}


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or an ImportError saying what to do."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "plots need matplotlib: install it with `pip install matplotlib` (a dependency "
            "declared in pyproject.toml; `make install` installs it)."
        ) from error
    return plt


def plot_lines(
    lines: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """One 600x400 PNG at ``path`` with a line ``(x, y), ...`` per label; returns the path.

    Lines of more than 20 points are drawn without markers.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, points in lines.items():
        xs, ys = zip(*points)
        style = "-" if len(points) > 20 else "o-"
        ax.plot(xs, ys, style, label=label, markersize=3, linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per quantity of ``run_dir``; returns their paths (sorted by name)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    curves = read_metrics(run_dir / "csv" / "metrics.csv")
    return [
        plot_lines(dict(sorted(series.items())), out_dir / f"{name}.png", "step", name,
                   f"{name} ({run_dir.name})")
        for name, series in sorted(curves.items())
    ]
