"""Pure functions from HF configs and state dicts to lens_det ones, one module per family.

Each family module has `config_from_hf(hf_config) -> LensConfig` and
`state_dict_from_hf(hf_state_dict, cfg) -> dict`; checkpoint quirks live there, out of the model.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from lens_det.convert import bloom, gemma

FAMILIES: dict[str, ModuleType] = {
    "bloom": bloom,
    "gemma": gemma,
    "gemma2": gemma,
    "gemma3_text": gemma,
    "gemma3": gemma,
    "vaultgemma": gemma,
    "gemma4_text": gemma,
    "gemma4": gemma,
    "gemma4_unified_text": gemma,
    "gemma4_unified": gemma,
}


def family_for(hf_config: Any) -> ModuleType:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported; lens_det supports {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]

