"""The contract "equal to HF", property-based (hypothesis).

Drawn: random VALID HF configs of every supported family (BloomConfig, GemmaConfig, Gemma2Config, Gemma3TextConfig,
VaultGemmaConfig, Gemma4TextConfig without MoE: per-layer embeddings, KV sharing, double-wide MLP, per-layer head dims
and kv heads, K = V, proportional RoPE, layer scalars): 1-3 layers, small hidden sizes (odd ones and non-multiples of 8
included), MQA/GQA/MHA, head_dim independent of hidden/heads (Gemma), odd intermediate sizes, vocab and pad id,
attention biases, sliding windows (1 to longer than the sequence) and random layer_types, soft-caps,
query_pre_attn_scalar, RoPE theta and linear scaling (per layer type for Gemma 3), Bloom's
apply_residual_connection_post_layernorm and pretraining_tp, tie_word_embeddings, the MLP activation ("gelu" is the
exact erf GELU for Gemma 2/3 and rewritten to the tanh form by Gemma 1's config); float32, bfloat16 and float16 weights
drawn N(0, std) from a seed (norm weights and biases too); random paddings (none, left, right, inner holes, single-token
rows; real tokens whose id is the pad id); position ids (HF forward's arange, HF generate's cumsum(mask) - 1, raw cumsum
with negative pad positions, an offset arange, a [1, pos] tensor); ragged chunk schedules for the cached run; and the
attention implementation both models run (eager, or sdpa where `lens_det.convert.sdpa_refusal` allows it: Gemma 1, 3 and
4 configs without an attention soft-cap; under sdpa hook_attn_scores / hook_pattern do not exist and are not compared).

Checked at tolerance 0.0: logits and every hook point, uncached and through both KV caches (lens_det KVCache vs
HF DynamicCache) on the same schedule (`lens_det.parity.compare`); logits against a plain HF forward (no reference
hooks installed) on the same schedule; greedy generate against HF generate; and configs lens_det does not
implement are refused with NotImplementedError, never answered differently.

A bounded, derandomized run is in the default suite; `pytest -m slow tests/parity/test_property.py` runs many more.
On failure hypothesis prints the drawn arguments and a copy-pastable `build_hf(...)` line (the kwargs go to
`AutoConfig.for_model`), the tokens, mask, chunk ends and position ids.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import lens_det
from lens_det.components.positions import positions_from_mask
from lens_det.config import LensConfig
from lens_det.parity import compare
from tests.strategies import Ragged, batches, build_hf, build_pair, config_kwargs, ragged_bounds, reproducer

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POSITION_MODES = ["arange", "mask", "raw_cumsum", "offset", "broadcast"]


def _positions(mode: str, mask: torch.Tensor, offset: int):
    """position_ids given to both models (None: each model's arange from its cache offset, HF forward's default)."""
    n = mask.shape[1]
    if mode == "arange":
        return None
    if mode == "mask":  # HF generate: cumsum(mask) - 1, pads at 0
        return "mask"
    if mode == "raw_cumsum":  # what a user may pass: left pads get negative positions
        return mask.long().cumsum(-1) - 1
    if mode == "offset":
        return (torch.arange(n) + offset).expand(mask.shape[0], n).contiguous()
    return (torch.arange(n) + offset)[None]  # "broadcast": [1, pos]


def _equal(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Bit-for-bit equality (NaN == NaN: float16 fully masked pad rows are NaN in both)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    same = (ours == ref) | (ours.isnan() & ref.isnan())
    if not bool(same.all()):
        diff = (ours.double() - ref.double()).abs().nan_to_num(nan=float("inf"))
        bad = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{what}: max |diff| {diff.max().item():.3g}, first at {bad}")


# ----------------------------------------------------------------------------------------------- checks


def check_parity(data, family, kwargs, dtype, seed, std, max_len: int = 10) -> None:
    hf, model = build_pair(data, family, kwargs, dtype, seed, std)
    model.set_use_attn_result(data.draw(st.booleans(), label="use_attn_result"))
    tokens, mask = data.draw(batches(kwargs["vocab_size"], kwargs["pad_token_id"], max_len=max_len),
                              label="tokens, mask")
    n = tokens.shape[1]
    if kwargs.get("sliding_window") == 1 and "sliding_attention" in kwargs.get("layer_types", ()):
        ends = (n,)  # HF's sliding cache is broken for a window of 1 (test_hf_cache_with_sliding_window_1 below)
    else:
        ends = data.draw(ragged_bounds(n), label="chunk ends")
    mode = data.draw(st.sampled_from(POSITION_MODES), label="positions") if family != "bloom" else "arange"
    positions = _positions(mode, mask, data.draw(st.integers(0, 7), label="offset"))
    for e in (family, dtype, f"positions {mode}", f"{len(ends)} chunk(s)", f"length {n}",
              f"activation {kwargs.get('hidden_act') or kwargs.get('hidden_activation')}"):
        event(str(e))  # shown by --hypothesis-show-statistics
    shown = positions if isinstance(positions, str | None) else f"torch.tensor({positions.tolist()})"
    note(f"tokens = torch.tensor({tokens.tolist()})\nmask = torch.tensor({mask.tolist()})\n"
         f"chunk ends = {ends}\nposition_ids = {shown}")

    # every hook point and the logits, uncached and on the schedule with both caches (HF reference hooks)
    report = compare(model, hf, tokens, mask, positions, schedule=Ragged.of(ends))
    assert report.passed and report.coverage == 1.0, report.to_text()

    # the logits again against a plain HF forward (no reference hooks installed), uncached and cached
    if isinstance(positions, str):
        positions = positions_from_mask(mask)
    pos_kw = (lambda a, b: {}) if positions is None or family == "bloom" else (
        lambda a, b: {"position_ids": positions[:, a:b]})
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask, **pos_kw(0, n))
        # use_cache=False: HF's default forward builds a cache, and its attention then reads K/V made contiguous
        # by the cache's torch.cat, not the transposed views; probs @ V can round differently in the last bit
        # (found on Gemma 4, head_dim 12). That path is HF's cached prefill, compared below.
        ref = hf(input_ids=tokens, attention_mask=mask, use_cache=False, **pos_kw(0, n)).logits
        _equal(ours, ref, "uncached logits vs plain HF")
        cache, hf_cache = model.new_cache(), DynamicCache(config=hf.config)
        for a, b in Ragged.of(ends).bounds():
            ours = model(tokens[:, a:b], attention_mask=mask[:, :b], kv_cache=cache, **pos_kw(a, b))
            ref = hf(input_ids=tokens[:, a:b], attention_mask=mask[:, :b], past_key_values=hf_cache,
                     use_cache=True, **pos_kw(a, b)).logits
            _equal(ours, ref, f"cached logits [{a}:{b}] vs plain HF")


def check_generate(data, family, kwargs, dtype, seed, std) -> None:
    hf, model = build_pair(data, family, kwargs, dtype, seed, std)
    vocab, pad = kwargs["vocab_size"], kwargs["pad_token_id"]
    n_rows, length = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    tokens = torch.randint(0, vocab, (n_rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(tokens)
    for row in range(n_rows):  # generate takes left padding, as HF generate does
        mask[row, : data.draw(st.integers(0, length - 1))] = 0
    use_cache = data.draw(st.booleans())
    if kwargs.get("sliding_window") == 1 and "sliding_attention" in kwargs.get("layer_types", ()):
        use_cache = False  # HF's sliding cache is broken for a window of 1 (test_hf_cache_with_sliding_window_1)
    note(f"tokens={tokens.tolist()} mask={mask.tolist()} use_cache={use_cache}")
    with torch.no_grad():
        ref = hf.generate(tokens, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=use_cache,
                          output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                          pad_token_id=0 if pad is None else pad)
    out = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[], use_kv_cache=use_cache)
    assert torch.equal(out.tokens, ref.sequences)
    for i, (ours, theirs) in enumerate(zip(out.logits, ref.logits, strict=True)):
        _equal(ours, theirs, f"generate step {i} logits")


COMMON = dict(deadline=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DRAWS = dict(data=st.data(), config=config_kwargs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
             std=st.sampled_from([0.05, 0.3, 1.0]))


@settings(max_examples=200, derandomize=True, **COMMON)
@given(**DRAWS)
def test_every_hook_equals_hf_on_random_configs_paddings_and_schedules(data, config, dtype, seed, std):
    check_parity(data, *config, dtype, seed, std)


@settings(max_examples=50, derandomize=True, **COMMON)
@given(**DRAWS)
def test_greedy_generate_equals_hf_generate_on_random_configs(data, config, dtype, seed, std):
    check_generate(data, *config, dtype, seed, std)


@pytest.mark.slow
@settings(max_examples=1500, **COMMON)
@given(**DRAWS)
def test_every_hook_equals_hf_long_run(data, config, dtype, seed, std):
    check_parity(data, *config, dtype, seed, std, max_len=16)


@pytest.mark.slow
@settings(max_examples=300, **COMMON)
@given(**DRAWS)
def test_greedy_generate_equals_hf_generate_long_run(data, config, dtype, seed, std):
    check_generate(data, *config, dtype, seed, std)


# ----------------------------------------------------------------------------------------------- refusals

# Valid HF configs that lens_det does not implement. Each must be refused at conversion (NotImplementedError), or,
# if lens_det ever accepts one, match HF bit for bit: never a silently different answer.
HF_ONLY_KNOBS = ["activation", "rope_type", "partial_rotary_factor", "bidirectional"]


def _hf_only(draw, family: str, knob: str) -> dict:
    if knob == "activation":  # any ACT2FN name runs in HF's Gemma MLP; lens_det implements the two GELUs
        name = draw(st.sampled_from(["silu", "gelu_new", "gelu_fast", "relu", "quick_gelu", "gelu_accurate", "tanh"]))
        return {"hidden_act" if family == "gemma" else "hidden_activation": name}
    if knob == "bidirectional":
        return {"use_bidirectional_attention": True}
    rope = ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4} if knob == "rope_type"
            else {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})
    if family == "gemma3_text":
        rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    return {"rope_parameters": rope}


@settings(max_examples=30, derandomize=True, **COMMON)
@given(data=st.data(), config=config_kwargs(families=("gemma", "gemma2", "gemma3_text")),
       knob=st.sampled_from(HF_ONLY_KNOBS), seed=st.integers(0, 2**16))
def test_configs_lens_det_does_not_implement_are_refused_not_answered_differently(data, config, knob, seed):
    family, kwargs = config
    kwargs = kwargs | _hf_only(data.draw, family, knob)
    note(reproducer(family, kwargs, torch.float32, seed, 0.3))
    hf = build_hf(family, kwargs, torch.float32, seed, 0.3)
    try:
        model = lens_det.from_hf_model(hf)
    except NotImplementedError:
        return
    tokens, mask = data.draw(batches(kwargs["vocab_size"], kwargs["pad_token_id"]))
    ends = data.draw(ragged_bounds(tokens.shape[1]))
    report = compare(model, hf, tokens, mask, "mask", schedule=Ragged.of(ends))
    assert report.passed, report.to_text()


@pytest.mark.parametrize("family, kwargs", [
    ("gemma", dict(layer_types=["sliding_attention"], sliding_window=2)),  # HF Gemma 1 ignores both fields
    ("bloom", dict(pretraining_tp=2, slow_but_exact=True)),
])
def test_other_refusals(family, kwargs):
    base = dict(vocab_size=16, num_hidden_layers=1, hidden_size=8)
    base |= dict(n_head=2) if family == "bloom" else dict(num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                                           intermediate_size=8)
    hf = build_hf(family, base | kwargs, torch.float32, 0, 0.3)
    with pytest.raises(NotImplementedError):
        LensConfig.from_hf_config(hf.config)


# ----------------------------------------------------------------------------------------------- found mismatches
# Minimal reproducers of the mismatches the properties found, kept out of the properties above. strict=True: when
# one is fixed the test XPASSes and fails, so the exclusion above can be removed with it.


def test_compare_accepts_equal_infinities_float16_bloom():
    """Found by the property: float16 Bloom's masked scores are -inf in both models, and compare() used to report
    (-inf) - (-inf) = NaN as an inf difference although every hook is bit-identical."""
    kwargs = dict(vocab_size=48, n_head=1, hidden_size=2, num_hidden_layers=1)
    hf = build_hf("bloom", kwargs, torch.float16, seed=0, std=1.0)
    model = lens_det.from_hf_model(hf)
    tokens = torch.tensor([[0, 0]])
    report = compare(model, hf, tokens, torch.ones_like(tokens))
    assert report.passed and report.max_abs() == 0.0, report.to_text()
    scores = [r for r in report.rows if r.hook.endswith("hook_attn_scores")]
    assert scores and all(r.bitwise for r in scores)


GEMMA2_WINDOW_1 = dict(vocab_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                       hidden_size=1, head_dim=2, intermediate_size=1, sliding_window=1,
                       layer_types=["sliding_attention"])


@pytest.mark.xfail(strict=True, reason="HF bug, not lens_det's: with sliding_window=1, DynamicSlidingWindowLayer "
                   "keeps every key (keys[:, :, -sliding_window + 1:] is keys[:, :, 0:]) and eager attention "
                   "broadcasts its 1-key mask over them, so HF cached attends to all past tokens while HF uncached "
                   "attends to the token itself only; lens_det's cache gives HF's uncached answer. (A chunk of 2+ "
                   "tokens after a cached one makes HF raise a shape error.)")
def test_hf_cache_with_sliding_window_1():
    hf = build_hf("gemma2", GEMMA2_WINDOW_1, torch.float32, seed=0, std=0.05)
    model = lens_det.from_hf_model(hf)
    tokens = torch.tensor([[0, 0]])
    assert compare(model, hf, tokens, schedule=Ragged.of((2,))).passed  # uncached and one-chunk cached: equal
    report = compare(model, hf, tokens, schedule=Ragged.of((1, 2)))
    assert report.passed, report.to_text()  # fails: cached:1 attn.hook_attn_scores / hook_pattern / hook_z
