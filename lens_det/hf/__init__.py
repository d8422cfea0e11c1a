"""Everything that knows Hugging Face's names and conventions, in one package (it imports only lens_det.config and
lens_det.presets, and, when hf_experts_implementation runs, the components' default experts implementation).

- one module per family (`bloom`, `gemma`): `config_from_hf(hf_config) -> LensConfig`,
  `state_dict_from_hf(hf_state_dict, cfg) -> dict`, and the family's lens<->HF module table (`DECODER_PREFIXES`,
  `LAYERS`, `MODEL_WEIGHTS`, the per-layer tables), which the state-dict conversion and lens_det.devices read;
  checkpoint quirks live there, out of the model;
- `FAMILIES` / `family_for` (dispatch on HF's `model_type`), `config_from_hf` and `config_from_name`, here;
- the attention-implementation rules (`sdpa_refusal`, `resolve_attn_implementation`, `hf_attn_implementation`), here;
- `checkpoint`: reading a checkpoint directory (hub / local resolution, lazy tensors, tokenizer, dtype, checks);
- `random_models`: seeded random HF models of the named configs.

It was `lens_det.convert`, which still re-exports it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from lens_det.config import LensConfig
from lens_det.hf import bloom, gemma
from lens_det.presets import hf_config_from_name

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
    "gemma3n_text": gemma,
    "gemma3n": gemma,
}


def family_for(hf_config: Any) -> ModuleType:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported; lens_det supports {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def config_from_hf(hf_config: Any) -> LensConfig:
    """The LensConfig of a `transformers` config object (BloomConfig, GemmaConfig, Gemma2Config, Gemma3TextConfig,
    VaultGemmaConfig, Gemma4TextConfig, or a Gemma3Config / Gemma4Config whose text part is used)."""
    return family_for(hf_config).config_from_hf(hf_config)


def config_from_name(name: str) -> LensConfig:
    """The LensConfig of a named config (lens_det.presets: "bloom-560m", "gemma-2-2b", "tiny-bloom", or the HF id)."""
    return config_from_hf(hf_config_from_name(name))


def module_names(cfg: LensConfig) -> tuple[dict[str, str], dict[str, str]]:
    """lens_det weight -> the HF module holding it, (under the decoder, under one decoder layer), from the family's
    lens<->HF tables: e.g. "ln2.w" -> "post_attention_layernorm" (Gemma 1) or "pre_feedforward_layernorm" (Gemma 2-4),
    "attn.w_o" -> "self_attn.o_proj", "moe.w_router" -> "router.proj". A weightless norm (Gemma 4's v_norm) is
    listed under the name its weight would have ("attn.v_norm.w"). The parity reference taps HF modules by these."""
    family = FAMILIES[cfg.architecture]
    layer = family.layer_weights(cfg.architecture)
    layer |= {f"{hf}.weight": f"{lens}.w" for hf, lens in getattr(family, "WEIGHTLESS_NORMS", {}).items()}
    return ({lens: hf.rpartition(".")[0] for hf, lens in family.MODEL_WEIGHTS.items()},
            {lens: hf.rpartition(".")[0] for hf, lens in layer.items()})


def decoder_of(hf_model: Any, cfg: LensConfig) -> Any:
    """The decoder module of an HF causal LM (or of the text part of a multimodal model): the first of the family's
    DECODER_PREFIXES that the model has and that holds the decoder layers."""
    family = FAMILIES[cfg.architecture]
    for prefix in family.DECODER_PREFIXES:
        try:
            decoder = hf_model.get_submodule(prefix.rstrip("."))
        except AttributeError:
            continue
        if hasattr(decoder, family.LAYERS):
            return decoder
    raise ValueError(f"{type(hf_model).__name__} has none of {family.DECODER_PREFIXES} holding .{family.LAYERS}")


ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def hf_class_name(cfg) -> str | None:
    """The HF class a LensConfig's model is: `hf_architecture`, or, for a config built without `architectures`
    (AutoConfig.for_model; save_pretrained fills it in later), its family's causal LM (e.g. Gemma3ForCausalLM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return cfg.hf_architecture or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.architecture)


def sdpa_refusal(cfg) -> str | None:
    """Why a model of this LensConfig cannot run "sdpa" (None: it can). lens_det runs sdpa exactly where HF does:
    HF's model class must support it (`_supports_sdpa`: not Bloom, Gemma 2 or VaultGemma), and HF's sdpa path takes
    no ALiBi bias and no attention soft-cap (it raises on a soft-cap)."""
    import transformers

    name = hf_class_name(cfg)
    hf_class = getattr(transformers, name or "", None)
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


def hf_experts_implementation(hf_model: Any) -> str:
    """The experts implementation an HF model runs (its text config's `_experts_implementation`; HF resolves
    None to "grouped_mm" when the model is built)."""
    from lens_det.components.moe import DEFAULT_EXPERTS_IMPLEMENTATION

    config = getattr(hf_model.config, "text_config", None) or hf_model.config
    return getattr(config, "_experts_implementation", None) or DEFAULT_EXPERTS_IMPLEMENTATION
