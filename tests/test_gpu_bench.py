"""experiments/bench/gpu.py runs end to end in its CPU smoke mode and writes its table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_bench_smoke_mode_writes_every_row(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "experiments" / "bench" / "gpu.py"
    done = subprocess.run([sys.executable, str(script), "--cpu-smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 1 + 4 + 2 + 6  # header, peak, raw steps, EMA, entry-point runs
    assert "failed" not in table
    ema = {line.split("|")[1].strip(): line for line in rows if "EMA update" in line}
    foreach_ops = int(ema["EMA update: ForeachEMA (foreach)"].split(" compute ops")[0].split()[-1])
    assert foreach_ops <= 10  # one foreach lerp (and the update count), not one op per tensor
    assert "scaled_dot_product" in table  # the attention op the step ran is named
