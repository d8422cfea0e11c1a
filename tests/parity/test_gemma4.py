"""Gemma 4 text beyond the tiny-gemma4 / tiny-gemma4-ple configs the parametrized suites run: the text part of
Gemma4ForConditionalGeneration, a variant without K = V (v_proj on full layers, HF then keeps the global kv-head
count), per-layer embeddings / KV sharing / double-wide MLP specifics (tiny-gemma4-ple: HF's logits_to_keep slicing
of the KV-sharing layers), and the mechanisms that are refused. Cache on/off equality with KV sharing:
tests/kv_cache/test_gemma4_cache.py; patches of a KV source reaching its consumers: tests/tl/test_patching_gemma4.py."""

import pytest
import torch
from transformers import AutoConfig, Gemma4Config, Gemma4ForConditionalGeneration

import lens_det
from lens_det.config import LensConfig, resolve_name
from lens_det.parity.models import random_hf_model_from_config
from tests.helpers import DTYPES, assert_bit_identical, batch


def tiny_fields(**changes) -> dict:
    fields = dict(resolve_name("tiny-gemma4")["hf_config"]) | changes
    return fields


def text_config(**changes):
    fields = tiny_fields(**changes)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["tiny-gemma4", "tiny-gemma4-ple"])
def test_conditional_generation_text_part(dtype, name):
    """Gemma4ForConditionalGeneration (no vision / audio towers): same decoder under model.language_model, and,
    unlike Gemma 3's, it applies the final soft-cap. With per-layer embeddings and KV sharing too (including the
    logits_to_keep cut of the KV-sharing layers)."""
    fields = dict(resolve_name(name)["hf_config"])
    cfg = Gemma4Config(text_config=fields, vision_config=None, audio_config=None)
    hf = random_hf_model_from_config(cfg, dtype, model_class=Gemma4ForConditionalGeneration).eval()
    model = lens_det.from_hf_model(hf)
    assert model.cfg.hf_architecture == "Gemma4ForConditionalGeneration" and model.cfg.final_softcap == 8.0
    assert model.cfg.d_head_per_layer is not None
    assert (model.cfg.k_eq_v is not None) == (name == "tiny-gemma4")
    assert_bit_identical(hf, model)
    assert_bit_identical(hf, model, chunk=3)
    tokens, mask = batch("left", model.cfg.d_vocab)
    with torch.no_grad():
        assert torch.equal(model(tokens, attention_mask=mask, logits_to_keep=1),
                           hf(tokens, attention_mask=mask, logits_to_keep=1).logits)


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
    assert_bit_identical(hf, model, chunk)


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
    assert_bit_identical(hf, model)
    assert_bit_identical(hf, model, chunk=2)


def test_proportional_rope_table():
    """HF's proportional inv_freq: int(f * d // 2) rotated pairs, exponents over the full d, then zeros."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = text_config()
    theirs, _ = ROPE_INIT_FUNCTIONS["proportional"](hf_cfg, layer_type="full_attention")
    model = lens_det.from_config("tiny-gemma4")
    ours = model.blocks[2].attn.inv_freq
    assert torch.equal(ours, theirs) and int((ours == 0).sum()) == 16 - 4


@pytest.mark.parametrize("field, value, match", [
    ("num_kv_shared_layers", 2, "without per-layer embeddings"),  # HF 5.23 itself fails on it
    ("use_bidirectional_attention", "all", "bidirectional"),
])
def test_configs_without_an_hf_reference_or_not_implemented_are_refused(field, value, match):
    changes = {field: value}
    with pytest.raises(NotImplementedError, match=match):
        LensConfig.from_hf_config(text_config(**changes))


def test_gemma4_fields_on_an_older_gemma_are_refused():
    fields = dict(resolve_name("tiny-gemma3")["hf_config"])
    hf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf.attention_k_eq_v = True
    with pytest.raises(NotImplementedError, match="attention_k_eq_v"):
        LensConfig.from_hf_config(hf)


# --- per-layer embeddings, KV sharing, double-wide MLP (tiny-gemma4-ple; E2B-style) ---

def test_ple_config_mechanisms(model_pair):
    """HF's kv_sharing_modes: each "reuse" layer reads the last non-shared layer of its type; the double-wide MLP
    is on those layers; consumers have no k/v weights, norms, hooks or cache entry."""
    hf, model = model_pair("tiny-gemma4-ple")
    c = model.cfg
    assert hf.config.kv_sharing_modes == [None, None, None, "store", "store", "reuse", "reuse", "reuse"]
    assert c.kv_source_layer == (None,) * 5 + (3, 3, 4) and model.kv_consumer_tail == 5
    assert c.d_mlp_per_layer == (96,) * 5 + (192,) * 3 and c.d_per_layer_input == 8
    for i in (5, 6, 7):
        attn = model.blocks[i].attn
        assert attn.w_k is None and attn.w_v is None and not hasattr(attn, "hook_k")
        assert model.blocks[i].mlp.w_in.shape == (192, c.d_model)
        with pytest.raises(ValueError, match=f"layer {c.kv_source_layer[i]}"):
            attn.W_K
    with pytest.raises(ValueError, match="MLP widths"):
        model.W_in
    assert "blocks.5.attn.W_K" not in model.tl_parameters() and "blocks.4.attn.W_K" in model.tl_parameters()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("keep", [1, 3, 20])
def test_logits_to_keep_runs_kv_sharing_layers_on_kept_positions(model_pair, dtype, padding, keep):
    """HF's eager forward with an integer logits_to_keep runs the KV-sharing layers on the last logits_to_keep
    positions only (_maybe_slice_kv_shared_inputs); lens_det does the same, so the kept logits are HF's bit for
    bit (in fp32 they differ from the full forward's rows), uncached and as a cached prefill + decode step."""
    from transformers import DynamicCache

    hf, model = model_pair("tiny-gemma4-ple", dtype)
    tokens, mask = batch(padding, model.cfg.d_vocab, length=12)
    pos = lens_det.positions_from_mask(mask)
    seen = []
    hook = ("blocks.6.hook_resid_pre", lambda x, hook: seen.append(x.shape[1]))
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
        with model.hooks(fwd_hooks=[hook]):
            ours = model(tokens, attention_mask=mask, position_ids=pos, logits_to_keep=keep)
        assert torch.equal(ours, ref) and seen == [min(keep, 12)]
        hf_cache, cache = DynamicCache(config=hf.config), model.new_cache()
        for a, b in ((0, 9), (9, 12)):
            ref = hf(tokens[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], logits_to_keep=keep,
                     past_key_values=hf_cache, use_cache=True).logits
            ours = model(tokens[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b],
                         logits_to_keep=keep, kv_cache=cache)
            assert torch.equal(ours, ref)
