"""Shared fixtures: tiny seeded random HF models (eager attention) and the batches the parity tests use."""

from __future__ import annotations

import pytest
import torch
import lens_det
from lens_det.parity.models import random_hf_model

BLOOM = ["tiny-bloom", "tiny-bloom-resid"]
GEMMA = ["tiny-gemma", "tiny-gemma2", "tiny-vaultgemma", "tiny-gemma3", "tiny-gemma4", "tiny-gemma4-ple",
         "tiny-gemma4-moe"]
ALL = BLOOM + GEMMA
DTYPES = [torch.float32, torch.bfloat16]


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


@pytest.fixture(scope="session")
def model_pair():
    """(hf_model, lens_model) per (name, dtype), built once per session."""
    built = {}

    def get(name: str, dtype: torch.dtype = torch.float32):
        if (name, dtype) not in built:
            hf = random_hf_model(name, dtype)
            built[(name, dtype)] = (hf, lens_det.from_hf_model(hf))
        return built[(name, dtype)]

    return get
