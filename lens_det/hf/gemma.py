"""Gemma 1, 2, 3, VaultGemma and Gemma 4 (text): docs/numerics.md §3-§6. One converter; the generations
differ only in config values."""

from __future__ import annotations

from typing import Any

from lens_det.config import LensConfig

# HF activation name -> what HF runs for it (transformers.activations.ACT2CLS): "gelu" is the exact erf GELU,
# "gelu_pytorch_tanh" F.gelu's tanh approximation. Other names are refused rather than approximated.
SUPPORTED_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu_erf"}
# The config field HF's modeling code reads for the MLP activation (Gemma 1's config already rewrites its legacy
# "gelu" to "gelu_pytorch_tanh" in hidden_act; Gemma 2/3/4 and VaultGemma read hidden_activation as given).
ACTIVATION_FIELD = {"gemma": "hidden_act"}
# Which Gemma generation's mechanisms each HF model_type uses (VaultGemma is Gemma 2 without the two post-norms).
# Gemma 4 "unified" (12B) is Gemma 4 text without per-layer embeddings or MoE, under its own model_type.
GENERATION = {"gemma": 1, "gemma2": 2, "vaultgemma": 2, "gemma3_text": 3, "gemma4_text": 4, "gemma4_unified_text": 4,
              "gemma3n_text": 4}  # Gemma 3n: Gemma 4's norms and attention, plus AltUp streams and LAuReL (ALTUP)
ALTUP = ("gemma3n_text",)
# Fields of Gemma 4 that change the computation; a Gemma 1-3 config carrying them is refused (not silently ignored).
GEMMA4_ONLY_FIELDS = ("hidden_size_per_layer_input", "num_kv_shared_layers", "global_head_dim", "attention_k_eq_v",
                      "enable_moe_block")


def _activation(hf: Any) -> str:
    field = ACTIVATION_FIELD.get(hf.model_type, "hidden_activation")
    name = getattr(hf, field, None)
    if name not in SUPPORTED_ACTIVATIONS:
        raise NotImplementedError(
            f"{field}={name!r} is not implemented (supported: {', '.join(map(repr, SUPPORTED_ACTIVATIONS))})"
        )
    return SUPPORTED_ACTIVATIONS[name]


def _rope(hf: Any, layer_types: tuple[str, ...]) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Per-layer (theta, linear factor, rotary fraction) from `rope_parameters` (one dict, or one per layer type).

    "proportional" (Gemma 4 full layers) rotates the first int(partial_rotary_factor * d_head // 2) frequency pairs
    (exponents over the full d_head) and leaves the rest unrotated; other types rotate every pair."""
    params = hf.rope_parameters
    per_type = params if set(params) <= {"full_attention", "sliding_attention"} else None
    thetas, factors, fractions = [], [], []
    for layer_type in layer_types:
        p = per_type[layer_type] if per_type else params
        rope_type = p.get("rope_type", "default")
        if rope_type not in ("default", "linear", "proportional"):
            raise NotImplementedError(
                f"rope_parameters rope_type={rope_type!r} is not implemented (supported: default, linear, proportional)"
            )
        fraction = p.get("partial_rotary_factor", 1.0)
        if rope_type == "proportional":
            fraction = 1.0 if fraction is None else float(fraction)  # HF's default when it is missing
        elif fraction not in (None, 1.0):
            raise NotImplementedError(f"partial_rotary_factor with rope_type={rope_type!r} is not implemented "
                                      "(only the 'proportional' type rotates part of the head here)")
        thetas.append(float(p["rope_theta"]))
        factors.append(float(p.get("factor", 1.0)) if rope_type in ("linear", "proportional") else 1.0)
        fractions.append(1.0 if rope_type != "proportional" else fraction)
    return tuple(thetas), tuple(factors), tuple(fractions)


def _global(hf: Any, name: str):
    """A config value as written at the top level, also on HF's heterogeneous (per_layer_config) configs, where a
    plain read of a per-layer attribute raises."""
    read = getattr(hf, "_getattr_without_heterogeneous_validation", None)
    return read(name) if read is not None else getattr(hf, name)


def _geometry(hf: Any, n_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-layer (head_dim, num_key_value_heads): HF's per_layer_config (Gemma 4) or the global values."""
    if getattr(hf, "is_heterogeneous", False):
        layers = [hf.per_layer_config[i] for i in range(n_layers)]
        return tuple(c.head_dim for c in layers), tuple(c.num_key_value_heads for c in layers)
    return (hf.head_dim,) * n_layers, (hf.num_key_value_heads,) * n_layers


def _kv_sharing(hf: Any, layer_types: tuple[str, ...]) -> tuple[int | None, ...] | None:
    """Per layer, the layer whose K/V it reuses (HF's kv_sharing_modes: each "reuse" layer reads the "store" layer,
    the last non-shared layer of its type), or None without num_kv_shared_layers."""
    if not getattr(hf, "num_kv_shared_layers", 0):
        return None
    modes = hf.kv_sharing_modes
    store = {layer_types[j]: j for j, mode in enumerate(modes) if mode == "store"}
    return tuple(store[t] if mode == "reuse" else None for t, mode in zip(layer_types, modes))


def _mlp_widths(hf: Any, kv_source: tuple[int | None, ...] | None) -> tuple[int, ...] | None:
    """Per-layer MLP width when use_double_wide_mlp doubles it on KV-sharing consumer layers (Gemma4TextMLP)."""
    if not (getattr(hf, "use_double_wide_mlp", False) and kv_source):
        return None
    return tuple(hf.intermediate_size * (2 if j is not None else 1) for j in kv_source)


def _refuse_unsupported(hf: Any, generation: int) -> None:
    if generation == 4:
        if getattr(hf, "num_kv_shared_layers", 0) and not getattr(hf, "hidden_size_per_layer_input", 0):
            # transformers 5.23's _maybe_slice_kv_shared_inputs slices per_layer_inputs even when it is None, so HF
            # eager raises on every multi-token forward: there is no reference to be bit-identical to
            raise NotImplementedError("num_kv_shared_layers without per-layer embeddings (hidden_size_per_layer_input) "
                                      "is not implemented: HF's eager forward fails on it (it slices the absent "
                                      "per-layer inputs), so there is no reference; every released KV-sharing "
                                      "checkpoint has both")
        if getattr(hf, "use_bidirectional_attention", None) == "all":
            raise NotImplementedError("use_bidirectional_attention='all' (non-causal attention) is not implemented")
        return
    for field in GEMMA4_ONLY_FIELDS:
        if getattr(hf, field, None):
            raise NotImplementedError(f"{field} (a Gemma 4 mechanism) is not implemented for model_type "
                                      f"{hf.model_type!r}")
    if getattr(hf, "use_bidirectional_attention", False):
        raise NotImplementedError("use_bidirectional_attention=True (EmbeddingGemma-style) is not implemented")


def config_from_hf(hf: Any) -> LensConfig:
    architecture = (getattr(hf, "architectures", None) or [None])[0]
    if getattr(hf, "text_config", None) is not None:  # Gemma3Config / Gemma4Config (multimodal): the text part
        default = {"gemma3": "Gemma3ForConditionalGeneration", "gemma4": "Gemma4ForConditionalGeneration",
                   "gemma3n": "Gemma3nForConditionalGeneration",
                   "gemma4_unified": "Gemma4UnifiedForConditionalGeneration"}
        architecture = architecture or default.get(hf.model_type)
        hf = hf.text_config
    model_type = hf.model_type
    if model_type not in GENERATION:
        raise NotImplementedError(f"model_type {model_type!r} is not supported by the Gemma converter")
    generation = GENERATION[model_type]
    _refuse_unsupported(hf, generation)
    n_layers = hf.num_hidden_layers
    layer_types = tuple(getattr(hf, "layer_types", None) or ("full_attention",) * n_layers)
    if generation == 1 and any(t != "full_attention" for t in layer_types):
        raise NotImplementedError("Gemma 1 with sliding-window layers is not implemented")
    theta, factor, fraction = _rope(hf, layer_types)
    final_softcap = getattr(hf, "final_logit_softcapping", None)
    if architecture == "Gemma3ForConditionalGeneration":
        final_softcap = None  # that class never applies it (docs/numerics.md §5); Gemma4ForConditionalGeneration does
    d_heads, kv_heads = _geometry(hf, n_layers)
    d_head, n_kv = _global(hf, "head_dim"), _global(hf, "num_key_value_heads")
    if generation == 1:
        attn_scale = d_head**-0.5  # docs/numerics.md §9.8
    elif generation in (2, 3):
        attn_scale = hf.query_pre_attn_scalar**-0.5
    else:
        attn_scale = 1.0  # Gemma4TextAttention.scaling: q_norm / k_norm set the scale
    kv_source = _kv_sharing(hf, layer_types)
    consumer = kv_source or (None,) * n_layers
    # consumers project no keys/values at all, so they have no K = V either
    k_eq_v = tuple(bool(getattr(hf, "attention_k_eq_v", False)) and t == "full_attention" and j is None
                   for t, j in zip(layer_types, consumer))
    ple = (getattr(hf, "hidden_size_per_layer_input", 0) or 0) if generation == 4 else 0
    altup = model_type in ALTUP
    widths = hf.intermediate_size if isinstance(hf.intermediate_size, (list, tuple)) else None
    d_mlp = widths[0] if widths else hf.intermediate_size
    if altup and hf.altup_active_idx != 0:
        raise NotImplementedError(f"altup_active_idx={hf.altup_active_idx} is not implemented (HF itself reads stream "
                                  "0 as the embedding's and adds the per-layer inputs to streams 1..)")
    sparsity = tuple(float(p) for p in hf.activation_sparsity_pattern) if altup else None
    return LensConfig(
        architecture=model_type,
        d_model=hf.hidden_size,
        n_layers=n_layers,
        n_heads=hf.num_attention_heads,
        d_head=d_head,
        d_mlp=d_mlp,
        d_vocab=hf.vocab_size,
        n_key_value_heads=n_kv,
        positional="rope",
        norm="rmsnorm",
        norm_eps=hf.rms_norm_eps,
        rmsnorm_unit_offset=generation <= 3,  # Gemma 4 multiplies by w itself
        rmsnorm_inv_sqrt="pow" if generation == 4 else "rsqrt",
        attn_scale=attn_scale,
        act_fn=_activation(hf),
        gated_mlp=True,
        layer_types=layer_types,
        sliding_window=hf.sliding_window if "sliding_attention" in layer_types else None,
        rope_theta=theta,
        rope_linear_factor=factor,
        rope_rotary_fraction=fraction if any(f != 1.0 for f in fraction) else None,
        d_head_per_layer=d_heads if set(d_heads) != {d_head} else None,
        n_key_value_heads_per_layer=kv_heads if set(kv_heads) != {n_kv} else None,
        k_eq_v=k_eq_v if any(k_eq_v) else None,
        embed_scale=True,
        post_attn_norm=generation >= 2 and model_type != "vaultgemma",  # VaultGemma drops both post-norms
        post_mlp_norm=generation >= 2 and model_type != "vaultgemma",
        qk_norm=generation >= 3,
        v_norm=generation == 4,
        layer_scalar=generation == 4 and not altup,
        n_streams=hf.altup_num_inputs if altup else 1,
        altup_correct_scale=bool(altup and hf.altup_correct_scale),
        laurel_rank=hf.laurel_rank if altup else 0,
        gate_sparsity=sparsity if sparsity and any(sparsity) else None,
        per_layer_oov_to_zero=altup,
        scales_in_model_dtype=altup,
        cut_kv_tail=not altup,  # Gemma 3n has no _maybe_slice_kv_shared_inputs
        d_per_layer_input=ple,
        d_vocab_per_layer_input=hf.vocab_size_per_layer_input if ple else None,
        kv_source_layer=kv_source,
        d_mlp_per_layer=tuple(widths) if widths and len(set(widths)) > 1 else _mlp_widths(hf, kv_source),
        attn_softcap=getattr(hf, "attn_logit_softcapping", None) if generation == 2 else None,  # §5: G3 ignores it
        final_softcap=final_softcap,
        attn_bias=hf.attention_bias,
        mlp_bias=False,
        embed_padding_idx=hf.pad_token_id,  # HF's embed_tokens(_per_layer) are nn.Embedding(..., padding_idx)
        tie_word_embeddings=getattr(hf, "tie_word_embeddings", True),
        pad_token_id=hf.pad_token_id,
        bos_token_id=hf.bos_token_id,
        eos_token_id=tuple(hf.eos_token_id) if isinstance(hf.eos_token_id, list) else hf.eos_token_id,
        hf_architecture=architecture,
        n_ctx=getattr(hf, "max_position_embeddings", None),
        **_experts(hf),
    )


def _experts(hf: Any) -> dict:
    """Gemma 4's mixture-of-experts fields (enable_moe_block), or none."""
    if not getattr(hf, "enable_moe_block", False):
        return {}
    return {"n_experts": hf.num_experts, "n_experts_per_token": hf.top_k_experts,
            "d_mlp_expert": hf.moe_intermediate_size}


# --- the lens<->HF module table of the Gemma family. state_dict_from_hf reads all of it; lens_det.devices reads the
# model-level part (DECODER_PREFIXES, LAYERS, MODEL_WEIGHTS, STATELESS) to take device-map keys in HF names. ---
# Where HF nests the decoder: transformers 5 puts the text model at model.language_model.*; hub checkpoints of the
# multimodal Gemma 3 store it as language_model.model.* (and language_model.lm_head.*).
DECODER_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
LAYERS = "layers"  # HF's list of decoder layers (lens_det's blocks)
STATELESS = ("rotary_emb",)  # HF modules without weights (nothing of lens_det's sits there)
# HF weight under the decoder -> lens_det weight, model level. The per-layer embeddings (Gemma 4 PLE) are read only
# with d_per_layer_input, lm_head only for an untied model.
MODEL_WEIGHTS = {"embed_tokens.weight": "embed.W_E", "norm.weight": "ln_final.w", "lm_head.weight": "unembed.weight"}
PLE_MODEL = {"embed_tokens_per_layer.weight": "ple.W_E", "per_layer_model_projection.weight": "ple.w_proj",
             "per_layer_projection_norm.weight": "ple.ln.w"}
MODEL_WEIGHTS |= PLE_MODEL
# Per decoder layer: HF module -> lens_det module of the norms, by model_type. Gemma 1's post_attention_layernorm
# is the pre-MLP norm.
NORMS = {
    "gemma": {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"},
    "gemma2": {
        "input_layernorm": "ln1",
        "post_attention_layernorm": "ln1_post",
        "pre_feedforward_layernorm": "ln2",
        "post_feedforward_layernorm": "ln2_post",
    },
}
NORMS["vaultgemma"] = {"input_layernorm": "ln1", "pre_feedforward_layernorm": "ln2"}
NORMS["gemma3_text"] = NORMS["gemma2"] | {"self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm"}
NORMS["gemma4_text"] = NORMS["gemma4_unified_text"] = NORMS["gemma3n_text"] = NORMS["gemma3_text"]
WEIGHTLESS_NORMS = {"self_attn.v_norm": "attn.v_norm"}  # Gemma 4's v_norm (with_scale=False): in no state dict
# Gemma 4's MoE block (enable_moe_block): its three extra norms, router and 3-D expert weights, per decoder layer.
EXPERTS = {
    "post_feedforward_layernorm_1.weight": "ln2_dense_post.w",
    "pre_feedforward_layernorm_2.weight": "ln2_moe.w",
    "post_feedforward_layernorm_2.weight": "ln2_moe_post.w",
    "router.scale": "moe.w_router_scale",
    "router.proj.weight": "moe.w_router",
    "router.per_expert_scale": "moe.per_expert_scale",
    "experts.gate_up_proj": "moe.w_gate_up",
    "experts.down_proj": "moe.w_out",
}
# HF linear -> lens_det weight name pattern ("{}" is "w" for the weight, "b" for a bias)
PROJECTIONS = {
    "self_attn.q_proj": "attn.{}_q",
    "self_attn.k_proj": "attn.{}_k",
    "self_attn.v_proj": "attn.{}_v",
    "self_attn.o_proj": "attn.{}_o",
    "mlp.gate_proj": "mlp.{}_gate",
    "mlp.up_proj": "mlp.{}_in",
    "mlp.down_proj": "mlp.{}_out",
}
# the key/value modules, which a KV-sharing consumer layer does not have
KV_MODULES = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.k_norm", "self_attn.v_norm")
# Gemma 3n's AltUp and LAuReL, per decoder layer; AltUp's stream projections, model level ("{}": the stream - 1)
ALTUP_BLOCK = {
    "altup.correct_output_scale": "altup.correct_output_scale",
    "altup.correction_coefs.weight": "altup.w_correct",
    "altup.prediction_coefs.weight": "altup.w_predict",
    "altup.modality_router.weight": "altup.w_router",
    "altup.router_norm.weight": "altup.w_router_norm",
    "laurel.linear_left.weight": "laurel.w_left",
    "laurel.linear_right.weight": "laurel.w_right",
    "laurel.post_laurel_norm.weight": "laurel.ln.w",
}
ALTUP_MODEL = {"altup_projections.{}.weight": "streams_in.w.{}",
               "altup_unembed_projections.{}.weight": "streams_out.w.{}"}
# Gemma 4 per-layer embeddings, per decoder layer
PLE_BLOCK = {"per_layer_input_gate.weight": "ple.w_gate", "per_layer_projection.weight": "ple.w_out",
             "post_per_layer_input_norm.weight": "ple.ln.w"}


def layer_weights(architecture: str) -> dict[str, str]:
    """HF weight under one decoder layer -> lens_det weight, every table above (what a layer may hold; which of them
    a given layer has depends on its config, see state_dict_from_hf)."""
    out = {f"{hf}.weight": f"{lens}.w" for hf, lens in NORMS[architecture].items()}
    out |= {f"{hf}.{kind}": lens.format(kind[0]) for hf, lens in PROJECTIONS.items() for kind in ("weight", "bias")}
    return out | PLE_BLOCK | EXPERTS | ALTUP_BLOCK


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
    """HF Gemma/Gemma2/VaultGemma/Gemma3/Gemma4 (CausalLM or ConditionalGeneration text part) state dict ->
    lens_det. K = V layers have no v_proj; Gemma 4's per-layer `layer_scalar` buffer becomes blocks.{i}.layer_scalar,
    its MoE weights blocks.{i}.moe.* and the MoE block's norms blocks.{i}.ln2_dense_post / ln2_moe / ln2_moe_post."""
    sd = strip_prefix(sd, DECODER_PREFIXES)
    absent = set() if cfg.d_per_layer_input else set(PLE_MODEL)
    if cfg.tie_word_embeddings:
        absent.add("lm_head.weight")
    out = {new: sd[old] for old, new in MODEL_WEIGHTS.items() if old not in absent}
    for k in range(cfg.n_streams - 1):
        out |= {new.format(k): sd[old.format(k)] for old, new in ALTUP_MODEL.items()}
    for i in range(cfg.n_layers):
        h, b = f"{LAYERS}.{i}.", f"blocks.{i}."
        consumer = cfg.layer_kv_source(i) is not None  # HF ignores a checkpoint's k/v weights of such layers
        for hf_name, name in NORMS[cfg.architecture].items():
            if not (consumer and hf_name in KV_MODULES):
                out[f"{b}{name}.w"] = sd[f"{h}{hf_name}.weight"]
        if cfg.layer_scalar:
            out[b + "layer_scalar"] = sd[h + "layer_scalar"]
        if cfg.d_per_layer_input:
            out |= {b + new: sd[h + old] for old, new in PLE_BLOCK.items()}
        if cfg.n_experts:
            out |= {b + name: sd[h + hf_name] for hf_name, name in EXPERTS.items()}
        if cfg.n_streams > 1:
            out |= {b + name: sd[h + hf_name] for hf_name, name in ALTUP_BLOCK.items()}
        for hf_name, name in PROJECTIONS.items():
            if hf_name == "self_attn.v_proj" and cfg.layer_k_eq_v(i) or consumer and hf_name in KV_MODULES:
                continue
            out[b + name.format("w")] = sd[f"{h}{hf_name}.weight"]
            if f"{h}{hf_name}.bias" in sd:
                out[b + name.format("b")] = sd[f"{h}{hf_name}.bias"]
    return out
