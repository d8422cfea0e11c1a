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



ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def sdpa_refusal(cfg) -> str | None:
    """Why a model of this LensConfig cannot run "sdpa" (None: it can). lens_det runs sdpa exactly where HF does:
    HF's model class must support it (`_supports_sdpa`: not Bloom, Gemma 2 or VaultGemma), and HF's sdpa path takes
    no ALiBi bias and no attention soft-cap (it raises on a soft-cap)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # a config built without `architectures` (AutoConfig.for_model) names no class: take the family's causal LM
    name = cfg.hf_architecture or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.architecture, "")
    hf_class = getattr(transformers, name, None)
    if hf_class is not None and not getattr(hf_class, "_supports_sdpa", False):
        return (f"HF runs {name} with eager attention only (its _supports_sdpa is False), so there is "
                "no sdpa reference to match")
    if cfg.positional == "alibi":
        return "HF's sdpa path has no ALiBi bias (Bloom is eager-only in HF)"
    if cfg.attn_softcap:
        return "HF's sdpa path refuses an attention soft-cap (attn_logit_softcapping), so the family is eager-only"
    return None


def default_attn_implementation(cfg) -> str:
    """What HF's from_pretrained picks when no attn_implementation is given: sdpa where the model supports it."""
    return "eager" if sdpa_refusal(cfg) else "sdpa"


def resolve_attn_implementation(cfg, value: str | None) -> str:
    """`value` checked for this config (None: HF's default), or ValueError saying what to pass instead."""
    if value is None:
        return default_attn_implementation(cfg)
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {value!r} (other "
                         "transformers implementations, e.g. flash_attention_2 or flex_attention, are not implemented)")
    why = sdpa_refusal(cfg) if value == "sdpa" else None
    if why:
        raise ValueError(f"attn_implementation='sdpa' is not available for this model: {why}; use 'eager'")
    return value


def hf_attn_implementation(hf_model) -> str:
    """The attention implementation HF runs for the decoder: the text config's `_attn_implementation` (the
    top-level config's where there is no text config; None, which HF's registry answers with eager, reads
    "eager"). One lens_det does not implement (flash_attention_2, flex_attention, ...) raises with what to do."""
    config = getattr(hf_model.config, "text_config", None) or hf_model.config
    value = getattr(config, "_attn_implementation", None) or "eager"
    if value not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"the HF model runs attn_implementation={value!r}, which lens_det does not implement (it has "
                         f"{', '.join(ATTN_IMPLEMENTATIONS)}): rebuild it with attn_implementation='sdpa' or 'eager', "
                         "or call hf_model.set_attn_implementation('sdpa') first")
    return value
