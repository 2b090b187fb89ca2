"""The one atomic-write helper: every file that must survive a kill is written through it.

Checkpoints, latent caches, feature statistics and metric reports are read back by later runs;
a process killed half-way through writing one (SIGKILL, OOM killer, preemption, power loss)
must leave either the old file or the new one, never a truncated mix. So the bytes go to a
hidden temporary file in the same directory (a rename is atomic only within one file
system), which is flushed and fsynced before ``os.replace`` puts it over the target, and the
directory is fsynced after it so the rename itself survives a crash.

A kill leaves at most a ``.<name>.tmp-<pid>-<random>`` file next to the target, which no
reader ever opens.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_text"]


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Yield a file whose content replaces ``path`` whole when the block exits without error.

    ``mode`` is ``"wb"`` (bytes) or ``"w"`` (UTF-8 text). Missing parent directories are
    created. On an exception the temporary file is removed, ``path`` is left as it was and
    the exception propagates.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    # O_EXCL: never write through a file another writer owns; 0o666: the umask applies, as
    # with open(), so the result has the permissions a plain write would give it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    with atomic_write(path, "w") as f:
        f.write(text)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX file systems; directories cannot be opened on Windows."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
