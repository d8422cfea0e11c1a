"""Gemma 1, 2 and 3 (text): docs/numerics.md §3-§5. One converter; the generations differ only in config values."""

from __future__ import annotations

from typing import Any

from lens_det.config import LensConfig

# HF activation name -> what HF runs for it (transformers.activations.ACT2CLS): "gelu" is the exact erf GELU,
# "gelu_pytorch_tanh" F.gelu's tanh approximation. Other names are refused rather than approximated.
SUPPORTED_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf"}
# The config field HF's modeling code reads for the MLP activation (Gemma 1's config already rewrites its legacy
# "gelu" to "gelu_pytorch_tanh" in hidden_act; Gemma 2/3 read hidden_activation as given).
ACTIVATION_FIELD = {"gemma": "hidden_act"}
# Gemma 4 (and other later) fields that change the computation; a config carrying them is refused.
UNSUPPORTED_FIELDS = (
    "hidden_size_per_layer_input",  # Gemma 4 per-layer embeddings
    "num_kv_shared_layers",
    "global_head_dim",
    "attention_k_eq_v",
    "enable_moe_block",
)


def _activation(hf: Any) -> str:
    field = ACTIVATION_FIELD.get(hf.model_type, "hidden_activation")
    name = getattr(hf, field, None)
    if name not in SUPPORTED_ACTIVATIONS:
        raise NotImplementedError(
            f"{field}={name!r} is not implemented (supported: {', '.join(map(repr, SUPPORTED_ACTIVATIONS))})"
        )
    return SUPPORTED_ACTIVATIONS[name]


def _rope(hf: Any, layer_types: tuple[str, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-layer (theta, linear factor) from `rope_parameters` (one dict, or one per layer type)."""
    params = hf.rope_parameters
    per_type = params if set(params) <= {"full_attention", "sliding_attention"} else None
    thetas, factors = [], []
    for layer_type in layer_types:
        p = per_type[layer_type] if per_type else params
        rope_type = p.get("rope_type", "default")
        if rope_type not in ("default", "linear"):
            raise NotImplementedError(
                f"rope_parameters rope_type={rope_type!r} is not implemented (supported: default, linear)"
            )
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError("rope_parameters partial_rotary_factor != 1 is not implemented")
        thetas.append(float(p["rope_theta"]))
        factors.append(float(p["factor"]) if rope_type == "linear" else 1.0)
    return tuple(thetas), tuple(factors)


def config_from_hf(hf: Any) -> LensConfig:
    architecture = (getattr(hf, "architectures", None) or [None])[0]
    if getattr(hf, "text_config", None) is not None:  # Gemma3Config (multimodal): the text part
        architecture = architecture or "Gemma3ForConditionalGeneration"
        hf = hf.text_config
    model_type = hf.model_type
    for field in UNSUPPORTED_FIELDS:
        if getattr(hf, field, None):
            raise NotImplementedError(f"{field} (a Gemma 4 mechanism) is not implemented")
    if getattr(hf, "use_bidirectional_attention", False):
        raise NotImplementedError("use_bidirectional_attention=True (EmbeddingGemma-style) is not implemented")
    generation = {"gemma": 1, "gemma2": 2, "gemma3_text": 3}[model_type]
    n_layers = hf.num_hidden_layers
    layer_types = tuple(getattr(hf, "layer_types", None) or ("full_attention",) * n_layers)
    if generation == 1 and any(t != "full_attention" for t in layer_types):
        raise NotImplementedError("Gemma 1 with sliding-window layers is not implemented")
    theta, factor = _rope(hf, layer_types)
    final_softcap = getattr(hf, "final_logit_softcapping", None)
    if architecture == "Gemma3ForConditionalGeneration":
        final_softcap = None  # that class never applies it (docs/numerics.md §5)
    d_head = hf.head_dim
    return LensConfig(
        architecture=model_type,
        d_model=hf.hidden_size,
        n_layers=n_layers,
        n_heads=hf.num_attention_heads,
        d_head=d_head,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_key_value_heads=hf.num_key_value_heads,
        positional="rope",
        norm="rmsnorm",
        norm_eps=hf.rms_norm_eps,
        rmsnorm_unit_offset=True,
        # Gemma 1 scales by head_dim ** -0.5, Gemma 2/3 by query_pre_attn_scalar ** -0.5 (docs/numerics.md §9.8)
        attn_scale=d_head**-0.5 if generation == 1 else hf.query_pre_attn_scalar**-0.5,
        act_fn=_activation(hf),
        gated_mlp=True,
        layer_types=layer_types,
        sliding_window=hf.sliding_window if "sliding_attention" in layer_types else None,
        rope_theta=theta,
        rope_linear_factor=factor,
        embed_scale=True,
        post_attn_norm=generation >= 2,
        post_mlp_norm=generation >= 2,
        qk_norm=generation == 3,
        attn_softcap=getattr(hf, "attn_logit_softcapping", None) if generation == 2 else None,  # §5: G3 ignores it
        final_softcap=final_softcap,
        attn_bias=hf.attention_bias,
        mlp_bias=False,
        tie_word_embeddings=getattr(hf, "tie_word_embeddings", True),
        pad_token_id=hf.pad_token_id,
        bos_token_id=hf.bos_token_id,
        eos_token_id=tuple(hf.eos_token_id) if isinstance(hf.eos_token_id, list) else hf.eos_token_id,
        hf_architecture=architecture,
        n_ctx=getattr(hf, "max_position_embeddings", None),
    )


# HF module names -> lens_det names, per decoder layer. Gemma 1's post_attention_layernorm is the pre-MLP norm.
_NORMS = {
    "gemma": {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"},
    "gemma2": {
        "input_layernorm": "ln1",
        "post_attention_layernorm": "ln1_post",
        "pre_feedforward_layernorm": "ln2",
        "post_feedforward_layernorm": "ln2_post",
    },
}
_NORMS["gemma3_text"] = _NORMS["gemma2"] | {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}
_PROJECTIONS = {
    "self_attn.q_proj": "attn.{}_q",
    "self_attn.k_proj": "attn.{}_k",
    "self_attn.v_proj": "attn.{}_v",
    "self_attn.o_proj": "attn.{}_o",
    "mlp.gate_proj": "mlp.{}_gate",
    "mlp.up_proj": "mlp.{}_in",
    "mlp.down_proj": "mlp.{}_out",
}


def strip_prefix(state_dict: dict, prefixes: tuple[str, ...]) -> dict:
    """Drop the first matching prefix from every key (checkpoints nest the decoder under different names)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def state_dict_from_hf(sd: dict, cfg: LensConfig) -> dict:
    """HF Gemma/Gemma2/Gemma3 (CausalLM or ConditionalGeneration text part) state dict -> lens_det."""
    # transformers 5 nests the text model at model.language_model.*; hub checkpoints of the multimodal
    # Gemma 3 store it as language_model.model.* (and language_model.lm_head.*).
    sd = strip_prefix(sd, ("model.language_model.", "language_model.model.", "language_model.", "model."))
    out = {"embed.W_E": sd["embed_tokens.weight"], "ln_final.w": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"layers.{i}.", f"blocks.{i}."
        for hf_name, name in _NORMS[cfg.architecture].items():
            out[f"{b}{name}.w"] = sd[f"{h}{hf_name}.weight"]
        for hf_name, name in _PROJECTIONS.items():
            out[b + name.format("w")] = sd[f"{h}{hf_name}.weight"]
            if f"{h}{hf_name}.bias" in sd:
                out[b + name.format("b")] = sd[f"{h}{hf_name}.bias"]
    if not cfg.tie_word_embeddings:
        out["unembed.weight"] = sd["lm_head.weight"]
    return out
