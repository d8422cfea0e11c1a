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


def state_dict_from_hf(sd: dict, cfg: LensConfig) -> dict:
    """HF BloomForCausalLM state dict -> lens_det. The fused per-head [q|k|v] projection is kept as is."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {
        "embed.W_E": sd["word_embeddings.weight"],
        "embed.ln.w": sd["word_embeddings_layernorm.weight"],
        "embed.ln.b": sd["word_embeddings_layernorm.bias"],
        "ln_final.w": sd["ln_f.weight"],
        "ln_final.b": sd["ln_f.bias"],
    }
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        out |= {
            b + "ln1.w": sd[h + "input_layernorm.weight"],
            b + "ln1.b": sd[h + "input_layernorm.bias"],
            b + "attn.w_qkv": sd[h + "self_attention.query_key_value.weight"],
            b + "attn.b_qkv": sd[h + "self_attention.query_key_value.bias"],
            b + "attn.w_o": sd[h + "self_attention.dense.weight"],
            b + "attn.b_o": sd[h + "self_attention.dense.bias"],
            b + "ln2.w": sd[h + "post_attention_layernorm.weight"],
            b + "ln2.b": sd[h + "post_attention_layernorm.bias"],
            b + "mlp.w_in": sd[h + "mlp.dense_h_to_4h.weight"],
            b + "mlp.b_in": sd[h + "mlp.dense_h_to_4h.bias"],
            b + "mlp.w_out": sd[h + "mlp.dense_4h_to_h.weight"],
            b + "mlp.b_out": sd[h + "mlp.dense_4h_to_h.bias"],
        }
    if not cfg.tie_word_embeddings:
        out["unembed.weight"] = sd["lm_head.weight"]
    return out
