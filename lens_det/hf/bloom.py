"""Bloom (`BloomForCausalLM`): docs/numerics.md §2."""

from __future__ import annotations

import math
from typing import Any

from lens_det.config import LensConfig


def config_from_hf(hf: Any) -> LensConfig:
    if getattr(hf, "pretraining_tp", 1) > 1 and getattr(hf, "slow_but_exact", False):
        raise NotImplementedError(
            "slow_but_exact=True with pretraining_tp > 1 (HF drops two biases and sums TP slices) is not "
            "implemented; released Bloom checkpoints use slow_but_exact=False"
        )
    d_head = hf.hidden_size // hf.n_head
    return LensConfig(
        architecture="bloom",
        d_model=hf.hidden_size,
        n_layers=hf.n_layer,
        n_heads=hf.n_head,
        d_head=d_head,
        d_mlp=4 * hf.hidden_size,
        d_vocab=hf.vocab_size,
        n_key_value_heads=hf.n_head,
        positional="alibi",
        norm="layernorm",
        norm_eps=hf.layer_norm_epsilon,
        attn_scale=1.0 / math.sqrt(d_head),  # BloomAttention.inv_norm_factor
        act_fn="bloom_gelu",
        gated_mlp=False,
        layer_types=("full_attention",) * hf.n_layer,
        embed_norm=True,
        fused_qkv=True,
        attn_bias=True,
        mlp_bias=True,
        residual_from_norm=hf.apply_residual_connection_post_layernorm,
        tie_word_embeddings=getattr(hf, "tie_word_embeddings", True),
        pad_token_id=hf.pad_token_id,
        bos_token_id=hf.bos_token_id,
        eos_token_id=hf.eos_token_id,
        hf_architecture=(getattr(hf, "architectures", None) or ["BloomForCausalLM"])[0],
        n_ctx=getattr(hf, "seq_length", None) or 2048,  # BloomConfig has no max positions; BLOOM trained on 2048
    )


# --- the lens<->HF module table of Bloom. state_dict_from_hf reads all of it; lens_det.devices reads the model-level
# part (DECODER_PREFIXES, LAYERS, MODEL_WEIGHTS, STATELESS) to take device-map keys in HF names. ---
DECODER_PREFIXES = ("transformer.",)  # BloomForCausalLM.transformer is the decoder
LAYERS = "h"  # HF's list of decoder layers (lens_det's blocks)
STATELESS = ()  # HF modules without weights
# HF weight under the decoder -> lens_det weight, model level (lm_head only for an untied model)
MODEL_WEIGHTS = {
    "word_embeddings.weight": "embed.W_E",
    "word_embeddings_layernorm.weight": "embed.ln.w",
    "word_embeddings_layernorm.bias": "embed.ln.b",
    "ln_f.weight": "ln_final.w",
    "ln_f.bias": "ln_final.b",
    "lm_head.weight": "unembed.weight",
}
# Per decoder layer: HF module -> lens_det module of the norms (LayerNorm: weight and bias), and HF linear -> lens_det
# weight name pattern ("{}" is "w" for the weight, "b" for the bias). The fused per-head [q|k|v] projection is kept.
NORMS = {"bloom": {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"}}
PROJECTIONS = {
    "self_attention.query_key_value": "attn.{}_qkv",
    "self_attention.dense": "attn.{}_o",
    "mlp.dense_h_to_4h": "mlp.{}_in",
    "mlp.dense_4h_to_h": "mlp.{}_out",
}


def layer_weights(architecture: str = "bloom") -> dict[str, str]:
    """HF weight under one decoder layer -> lens_det weight (every layer holds all of them)."""
    tables = (NORMS[architecture], PROJECTIONS)
    return {f"{hf}.{kind}": (lens + ".{}" if table is NORMS[architecture] else lens).format(kind[0])
            for table in tables for hf, lens in table.items() for kind in ("weight", "bias")}


LAYER_WEIGHTS = layer_weights()


def state_dict_from_hf(sd: dict, cfg: LensConfig) -> dict:
    """HF BloomForCausalLM state dict -> lens_det (MODEL_WEIGHTS and LAYER_WEIGHTS)."""
    prefix, = DECODER_PREFIXES
    sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    out = {new: sd[old] for old, new in MODEL_WEIGHTS.items() if old != "lm_head.weight" or not cfg.tie_word_embeddings}
    for i in range(cfg.n_layers):
        h, b = f"{LAYERS}.{i}.", f"blocks.{i}."
        out |= {b + new: sd[h + old] for old, new in LAYER_WEIGHTS.items()}
    return out
