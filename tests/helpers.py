"""Shared test helpers (plain functions and constants; fixtures live in conftest.py): the tiny configs per family,
the dtypes, the padded batches the parity tests use, and a whole-model 0.0 parity assertion."""

from __future__ import annotations

import torch

import lens_det
from lens_det.parity import compare
from lens_det.presets import tiny_configs

BLOOM = tiny_configs("bloom")
GEMMA = tiny_configs("gemma")
ALL = BLOOM + GEMMA
DTYPES = [torch.float32, torch.bfloat16]
MOE = "tiny-gemma4-moe"  # Gemma 4 with a mixture of experts
EXPERTS_IMPLEMENTATIONS = ["grouped_mm", "eager"]  # HF's default first


def batch(kind: str, vocab: int, batch_size: int = 3, length: int = 16, seed: int = 1):
    """(tokens, mask) with no padding, left padding, right padding, or pads inside a sequence."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch_size, length), generator=gen)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    if kind == "left":
        mask[0, :5] = 0
        mask[1, :1] = 0
    elif kind == "right":
        mask[0, -4:] = 0
        mask[2, -1:] = 0
    elif kind == "inner":
        mask[0, 3:6] = 0
        mask[1, :2] = 0
        mask[1, 9] = 0
    elif kind != "none":
        raise ValueError(kind)
    return tokens, mask


def assert_bit_identical(hf, model, chunk=None):
    """Every hook bit-identical uncached and, with `chunk`, through the KV cache in steps of `chunk`."""
    tokens, mask = batch("left", model.cfg.d_vocab)
    positions = lens_det.positions_from_mask(mask)
    if chunk is None:
        report = compare(model, hf, tokens, mask, positions, prefill=tokens.shape[1], decode_steps=0)
    else:
        report = compare(model, hf, tokens, mask, positions, prefill=5, chunk=chunk)
    assert report.coverage == 1.0, report.missing
    assert report.passed and report.max_abs() == 0.0, report.to_text()
