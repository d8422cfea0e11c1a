"""Shared fixtures: tiny seeded random HF models (eager attention). Helpers and constants: tests/helpers.py."""

from __future__ import annotations

import pytest
import torch
import lens_det
from lens_det.parity.models import random_hf_model
from tests.helpers import MOE


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


@pytest.fixture(scope="module")
def moe_pairs():
    """(hf_model, lens_model) of tiny-gemma4-moe per (experts implementation, dtype), built once per module."""
    built = {}

    def get(implementation, dtype):
        if (implementation, dtype) not in built:
            hf = random_hf_model(MOE, dtype, experts_implementation=implementation)
            built[(implementation, dtype)] = hf, lens_det.from_hf_model(hf)
        return built[(implementation, dtype)]
    return get
