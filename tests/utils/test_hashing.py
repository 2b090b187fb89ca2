"""The hashing helpers (files and state dicts: tests/data/test_latent_cache.py)."""

from __future__ import annotations

import hashlib

import torch

from ldm_lightning.utils.hashing import state_dict_sha256, tensors_sha256, text_sha256


def test_tensor_hashes_see_dtype_shape_order_and_text() -> None:
    a, b = torch.arange(4.0), torch.ones(2, 2)
    base = tensors_sha256([a, b], "captions")
    assert tensors_sha256([a, None, b], "captions") == base  # None is skipped
    assert tensors_sha256([b, a], "captions") != base
    assert tensors_sha256([a.half(), b], "captions") != base
    assert tensors_sha256([a, b.reshape(4)], "captions") != base
    assert tensors_sha256([a, b], "other") != base
    # A state dict hash is the same digest with each tensor's name in front.
    assert state_dict_sha256({"w": a}) != tensors_sha256([a])


def test_text_sha256_is_the_sha256_of_utf8() -> None:
    assert text_sha256("κλειδί") == hashlib.sha256("κλειδί".encode()).hexdigest()
