"""`python -m ldm_lightning.plots`: CSVLogger metrics -> one PNG curve per quantity."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from ldm_lightning.plots import main
from ldm_lightning.utils.curves import quantity, read_metrics

CSV = """epoch,lr-AdamW,step,train/loss_epoch,train/loss_step,val/fid,val/loss
0,0.001,0,,0.9,,
0,,1,,0.7,,
0,,1,0.8,,,
0,,1,,,25.5,0.6
1,0.001,2,,0.5,,
1,,3,,nan,,
1,,3,0.5,,,
1,,3,,,12.25,0.4
"""


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(CSV)
    return tmp_path


def test_quantity_groups_stages_and_reductions() -> None:
    assert quantity("train/loss_step") == quantity("val/loss") == "loss"
    assert quantity("val/fid") == "fid" and quantity("lr-AdamW") == "lr-AdamW"
    assert quantity("train/images_per_sec") == "images_per_sec"


def test_read_metrics_collects_each_series_by_step(run_dir: Path) -> None:
    curves = read_metrics(run_dir / "csv" / "metrics.csv")
    assert sorted(curves) == ["fid", "loss", "lr-AdamW"]
    assert curves["fid"] == {"val/fid": [(1, 25.5), (3, 12.25)]}
    assert curves["loss"]["train/loss_step"] == [(0, 0.9), (1, 0.7), (2, 0.5)]  # nan skipped
    assert curves["loss"]["train/loss_epoch"] == [(1, 0.8), (3, 0.5)]
    assert curves["loss"]["val/loss"] == [(1, 0.6), (3, 0.4)]


def test_plots_writes_one_png_per_quantity(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "figures"
    paths = main([str(run_dir), "--out", str(out)])
    assert [p.name for p in paths] == ["fid.png", "loss.png", "lr-AdamW.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (600, 400)
    assert str(out / "fid.png") in capsys.readouterr().out


def test_missing_csv_says_how_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="logger=csv"):
        read_metrics(tmp_path / "csv" / "metrics.csv")
