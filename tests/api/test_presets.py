"""lens_det.presets: the tiny-config list (read by the CLI and tests/helpers.py) and the lens<->HF module tables."""

from __future__ import annotations

import pytest
import torch

from lens_det.hf import FAMILIES
from lens_det.hf.random_models import random_hf_model
from lens_det.presets import named_configs, tiny_configs


def test_tiny_configs_are_every_tiny_named_config_split_by_family():
    """Every model_configs/tiny-*.json is in tiny_configs() exactly once, and the family split covers it."""
    tiny = sorted(name for name in named_configs() if name.startswith("tiny-"))
    assert sorted(tiny_configs()) == tiny and len(set(tiny_configs())) == len(tiny)
    assert tiny_configs("bloom") + tiny_configs("gemma") == tiny_configs()
    assert all(named_configs()[n]["hf_config"]["model_type"] == "bloom" for n in tiny_configs("bloom"))


def test_tiny_configs_refuses_an_unknown_family():
    with pytest.raises(ValueError, match="family must be 'bloom', 'gemma' or None"):
        tiny_configs("llama")


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma4-ple"])
def test_model_weight_tables_name_real_hf_modules(name):
    """Each MODEL_WEIGHTS key (which lens_det.devices turns into device-map names) is a weight of the HF model
    under one of the family's DECODER_PREFIXES, or the top-level lm_head (an exact name match: no tolerance)."""
    hf = random_hf_model(name, torch.float32)
    family = FAMILIES[hf.config.model_type]
    keys = set(hf.state_dict())
    for hf_key in family.MODEL_WEIGHTS:
        candidates = {hf_key} | {prefix + hf_key for prefix in family.DECODER_PREFIXES}
        assert candidates & keys, f"{hf_key} is no weight of {type(hf).__name__}"
    assert any(k.startswith(tuple(p + family.LAYERS + ".0." for p in family.DECODER_PREFIXES)) for k in keys)
