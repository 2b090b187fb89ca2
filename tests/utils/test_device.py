"""The ``device=`` key of the entry points."""

from __future__ import annotations

import pytest
import torch

from ldm_lightning.utils.device import resolve_device


def test_auto_is_cuda_when_available_and_names_pass_through() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RuntimeError):
        resolve_device("nonsense")
