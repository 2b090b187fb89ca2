"""atomic_write: the target holds the old content or the new, whole; never a mix."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm_lightning.utils.atomic import atomic_torch_save, atomic_write, atomic_write_text

REPO = Path(__file__).parents[2]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_the_file_appears_whole_with_the_permissions_of_a_plain_write(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "data.bin"  # parents are created
    old_umask = os.umask(0o022)
    try:
        with atomic_write(target) as f:
            f.write(b"abc")
            assert not target.exists()  # nothing at the target until the block ends
            assert leftovers(target.parent)[0].startswith(f".data.bin.tmp-{os.getpid()}-")
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"abc"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert leftovers(target.parent) == []


def test_text_and_torch_helpers_replace_the_old_file(tmp_path: Path) -> None:
    text = tmp_path / "report.json"
    text.write_text("old")
    atomic_write_text(text, '{"fid": 1.5, "name": "é"}')
    assert text.read_text(encoding="utf-8") == '{"fid": 1.5, "name": "é"}'
    tensors = tmp_path / "t.pt"
    atomic_torch_save({"x": torch.arange(3)}, tensors)
    assert torch.equal(torch.load(tensors, weights_only=True)["x"], torch.arange(3))
    assert leftovers(tmp_path) == []


def test_an_exception_mid_write_keeps_the_old_content_and_no_tmp_file(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old and whole")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_write(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")
    assert target.read_bytes() == b"old and whole"
    assert leftovers(tmp_path) == []


def test_only_whole_file_write_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w'"), atomic_write(
        tmp_path / "x", "ab"
    ):
        pass


def test_a_sigkill_mid_write_leaves_the_old_file_intact(tmp_path: Path) -> None:
    target = tmp_path / "stats.pt"
    atomic_torch_save({"step": torch.tensor(1)}, target)
    before = target.read_bytes()
    child = (
        "import os, signal, sys\n"
        "from ldm_lightning.utils.atomic import atomic_write\n"
        "with atomic_write(sys.argv[1]) as f:\n"
        "    f.write(b'x' * 100_000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", child, str(target)], cwd=REPO, capture_output=True, timeout=120
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True)["step"] == 1
    # The child really died mid-write: its half-written tmp file is left, hidden and ignored.
    (tmp,) = leftovers(tmp_path)
    assert tmp.startswith(".stats.pt.tmp-") and (tmp_path / tmp).stat().st_size == 100_000
