"""Shared fixtures: tiny seeded random HF models (eager attention). Helpers and constants: tests/helpers.py."""

from __future__ import annotations

import pytest
import torch
import lens_det
from lens_det.parity.models import random_hf_model


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
