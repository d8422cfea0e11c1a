"""Gemma 3n (text): AltUp streams, LAuReL, gaussian top-k gate sparsity, stream-targeted per-layer inputs, KV
sharing without the logits_to_keep cut. The generic suites run tiny-gemma3n too (every hook at 0.0 cache off and on,
paddings, dtypes, generate, backward); this file holds what is Gemma 3n's own: the config conversion, the pitfalls
that must break parity, HF generate on ids outside the per-layer table, and the TransformerLens conveniences that are
refused on a multi-stream model (each with its reason)."""

from __future__ import annotations

import pytest
import torch

import lens_det
from lens_det.parity import compare, faults
from tests.helpers import DTYPES, batch

NAME = "tiny-gemma3n"


def _inputs(model, length=12):
    tokens, mask = batch("left", model.cfg.d_vocab, length=length)
    tokens[:, -3:] = torch.tensor([100, 127, 96])  # ids past the 96-row per-layer table read its row 0
    return tokens, mask, lens_det.positions_from_mask(mask)


def test_config_names_every_mechanism(model_pair):
    _, model = model_pair(NAME)
    c = model.config
    assert (c.n_streams, c.laurel_rank, c.altup_correct_scale) == (4, 8, True)
    assert c.gate_sparsity == (0.95, 0.8, 0.0, 0.0, 0.6, 0.0)
    assert c.kv_source_layer == (None, None, None, None, 1, 3) and model.kv_consumer_tail is None  # no cut
    assert c.d_mlp_per_layer == (64, 96, 64, 80, 64, 96) and c.d_vocab_per_layer_input == 96
    assert c.per_layer_oov_to_zero and c.scales_in_model_dtype and not c.cut_kv_tail and not c.layer_scalar


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("prefill,chunk", [(12, 1), (5, 3), (1, 1)])
def test_every_hook_bit_identical_with_ids_outside_the_per_layer_table(model_pair, dtype, prefill, chunk):
    hf, model = model_pair(NAME, dtype)
    tokens, mask, positions = _inputs(model)
    report = compare(model, hf, tokens, mask, positions, prefill=prefill, chunk=chunk,
                     decode_steps=0 if prefill == 12 else None)
    assert report.coverage == 1.0, report.missing
    assert report.passed and report.max_abs() == 0.0, report.to_text()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_generate_equals_hf_generate(model_pair, dtype):
    """Tokens and every step's logits at 0.0: HF runs every layer on every prompt position (no KV-tail cut)."""
    hf, model = model_pair(NAME, dtype)
    tokens, mask, _ = _inputs(model)
    ours = model.generate(tokens, mask, max_new_tokens=6, stop_tokens=[])
    theirs = hf.generate(tokens, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                         output_logits=True, return_dict_in_generate=True)
    assert torch.equal(ours.tokens, theirs.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, theirs.logits))


@pytest.mark.parametrize("fault,first", [
    (faults.stream_magnitude_not_matched, "streams_in.hook_streams"),
    (faults.gate_std_unbiased, "blocks.0.mlp.hook_sparse_gate"),
    (faults.per_layer_input_on_every_stream, "blocks.0.hook_resid_post"),  # stream 0 is where it lands wrongly
])
def test_pitfalls_break_parity_where_they_happen(model_pair, fault, first):
    hf, model = model_pair(NAME)
    tokens, mask, positions = _inputs(model)
    with fault(model):
        report = compare(model, hf, tokens, mask, positions, prefill=12, decode_steps=0)
    assert not report.passed
    assert report.first_divergence.hook == first, report.to_text()
    assert compare(model, hf, tokens, mask, positions, prefill=12, decode_steps=0).passed  # restored


def test_resid_hooks_are_stream_0_and_an_edit_replaces_it(model_pair):
    """hook_resid_pre / hook_resid_post are stream 0 of the block's input / output stack (TransformerLens 4's
    bridge meaning); an edit of hook_resid_pre changes stream 0 only, so the router and every prediction (all of
    which mix stream 0) see it, and the other streams of that block's input are untouched."""
    _, model = model_pair(NAME)
    tokens, mask, _ = _inputs(model)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    for i in range(model.cfg.n_layers):
        assert torch.equal(cache[f"blocks.{i}.hook_resid_pre"], cache[f"blocks.{i}.hook_streams_pre"][0])
        assert torch.equal(cache[f"blocks.{i}.hook_resid_post"], cache[f"blocks.{i}.hook_streams_post"][0])
    zero = ("blocks.2.hook_resid_pre", lambda x, hook: torch.zeros_like(x))
    with model.hooks(fwd_hooks=[zero]):
        _, edited = model.run_with_cache(tokens, attention_mask=mask)
    stack = edited["blocks.2.hook_streams_pre"]
    assert torch.equal(stack[1:], cache["blocks.2.hook_streams_pre"][1:]) and stack[0].abs().max() == 0
    predictions = edited["blocks.2.altup.hook_predictions"]
    assert all(not torch.equal(predictions[s], cache["blocks.2.altup.hook_predictions"][s]) for s in range(4))


def test_per_layer_inputs_reach_streams_1_and_up_only(model_pair):
    _, model = model_pair(NAME)
    tokens, mask, _ = _inputs(model)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    corrected, post = cache["blocks.1.altup.hook_corrected"], cache["blocks.1.hook_streams_post"]
    assert torch.equal(post[0], corrected[0])
    assert torch.equal(post[1:], corrected[1:] + cache["blocks.1.hook_ple_out"])


def test_what_a_multi_stream_model_refuses(model_pair):
    """TransformerLens conveniences that assume one residual stream raise, each saying why."""
    _, model = model_pair(NAME)
    tokens, mask, _ = _inputs(model)
    with pytest.raises(NotImplementedError, match="multi-stream"):
        model(tokens, attention_mask=mask, stop_at_layer=2)
    with pytest.raises(NotImplementedError, match="multi-stream"):
        model(tokens, attention_mask=mask, start_at_layer=2)
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    for call in (lambda: cache.logit_lens(), lambda: cache.accumulated_resid(apply_ln=True),
                 lambda: cache.decompose_resid(), lambda: cache.get_full_resid_decomposition()):
        with pytest.raises(ValueError, match="AltUp"):
            call()
    from lens_det.weight_processing import why_not

    assert all("multi-stream" in why_not(model.config, step) for step in
               ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"))
    with pytest.raises(ValueError, match="multi-stream"):
        lens_det.from_hf_model(model_pair(NAME)[0], fold_ln=True)


def test_altup_active_idx_other_than_0_is_refused():
    from lens_det.config import LensConfig
    from lens_det.presets import hf_config_from_name

    hf_config = hf_config_from_name(NAME)
    hf_config.altup_active_idx = 1
    with pytest.raises(NotImplementedError, match="altup_active_idx=1"):
        LensConfig.from_hf_config(hf_config)
