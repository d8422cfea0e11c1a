"""Gemma 4 text beyond the tiny-gemma4 config the parametrized suites run: the text part of
Gemma4ForConditionalGeneration, a variant without K = V (v_proj on full layers, HF then keeps the global kv-head
count), and the phase-2 mechanisms that are refused."""

import pytest
import torch
from transformers import AutoConfig, Gemma4Config, Gemma4ForConditionalGeneration

import lens_det
from lens_det.config import LensConfig, resolve_name
from lens_det.parity import compare
from lens_det.parity.models import random_hf_model_from_config
from tests.conftest import DTYPES, batch


def tiny_fields(**changes) -> dict:
    fields = dict(resolve_name("tiny-gemma4")["hf_config"]) | changes
    return fields


def text_config(**changes):
    fields = tiny_fields(**changes)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def assert_parity(hf, model, chunk=None):
    """Every hook bit-identical uncached and, with `chunk`, through the KV cache in steps of `chunk`."""
    tokens, mask = batch("left", model.cfg.d_vocab)
    positions = lens_det.positions_from_mask(mask)
    if chunk is None:
        report = compare(model, hf, tokens, mask, positions, prefill=tokens.shape[1], decode_steps=0)
    else:
        report = compare(model, hf, tokens, mask, positions, prefill=5, chunk=chunk)
    assert report.coverage == 1.0, report.missing
    assert report.passed and report.max_abs() == 0.0, report.to_text()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conditional_generation_text_part(dtype):
    """Gemma4ForConditionalGeneration (no vision / audio towers): same decoder under model.language_model, and,
    unlike Gemma 3's, it applies the final soft-cap."""
    cfg = Gemma4Config(text_config=tiny_fields(), vision_config=None, audio_config=None)
    hf = random_hf_model_from_config(cfg, dtype, model_class=Gemma4ForConditionalGeneration).eval()
    model = lens_det.from_hf_model(hf)
    assert model.cfg.hf_architecture == "Gemma4ForConditionalGeneration" and model.cfg.final_softcap == 8.0
    assert model.cfg.d_head_per_layer is not None and model.cfg.k_eq_v is not None
    assert_parity(hf, model)
    assert_parity(hf, model, chunk=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_without_k_eq_v(dtype, chunk):
    """attention_k_eq_v=False: full layers have a v_proj, and HF applies num_global_key_value_heads only with
    K = V, so they keep num_key_value_heads (2) while their head dim is global_head_dim. Proportional RoPE at 1/2
    with a linear factor on full layers, θ 1e4 on sliding ones."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e6,
                               "factor": 2.0}}
    hf = random_hf_model_from_config(text_config(attention_k_eq_v=False, rope_parameters=rope), dtype)
    model = lens_det.from_hf_model(hf)
    c = model.cfg
    assert c.k_eq_v is None and c.n_key_value_heads_per_layer is None and c.d_head_per_layer[2] == 32
    assert c.rope_rotary_fraction[2] == 0.5 and c.rope_linear_factor[2] == 2.0
    assert model.blocks[2].attn.w_v.shape == (2 * 32, c.d_model)
    assert_parity(hf, model, chunk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemma4_unified_text(dtype):
    """Gemma 4 "unified" (the 12B: its own model_type gemma4_unified_text and classes, a Gemma 2-style decoder
    layer with layer_scalar) computes what Gemma 4 text without per-layer embeddings computes: bit-identical."""
    fields = tiny_fields(model_type="gemma4_unified_text", architectures=["Gemma4UnifiedForCausalLM"])
    for field in ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block"):
        fields.pop(field)
    hf = random_hf_model_from_config(AutoConfig.for_model(fields.pop("model_type"), **fields), dtype)
    assert type(hf).__name__ == "Gemma4UnifiedForCausalLM"
    model = lens_det.from_hf_model(hf)
    assert model.cfg.architecture == "gemma4_unified_text" and model.cfg.layer_scalar
    assert_parity(hf, model)
    assert_parity(hf, model, chunk=2)


def test_proportional_rope_table():
    """HF's proportional inv_freq: int(f * d // 2) rotated pairs, exponents over the full d, then zeros."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = text_config()
    theirs, _ = ROPE_INIT_FUNCTIONS["proportional"](hf_cfg, layer_type="full_attention")
    model = lens_det.from_config("tiny-gemma4")
    ours = model.blocks[2].attn.inv_freq
    assert torch.equal(ours, theirs) and int((ours == 0).sum()) == 16 - 4


@pytest.mark.parametrize("field, value, match", [
    ("hidden_size_per_layer_input", 8, "per-layer embeddings"),
    ("num_kv_shared_layers", 2, "KV sharing"),
    ("use_bidirectional_attention", "all", "bidirectional"),
])
def test_phase_two_mechanisms_are_refused(field, value, match):
    changes = {field: value}
    with pytest.raises(NotImplementedError, match=match):
        LensConfig.from_hf_config(text_config(**changes))


def test_gemma4_fields_on_an_older_gemma_are_refused():
    fields = dict(resolve_name("tiny-gemma3")["hf_config"])
    hf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf.attention_k_eq_v = True
    with pytest.raises(NotImplementedError, match="attention_k_eq_v"):
        LensConfig.from_hf_config(hf)
