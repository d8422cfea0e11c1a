"""Continuing a generation from its KV cache, the HF way, and TransformerLens's `freq_penalty`.

`generate(out.tokens, out.attention_mask or None, kv_cache=out.kv_cache)` runs only the positions the cache does
not hold yet (HF generate with `past_key_values`), so two calls equal one call of the summed length: same tokens,
same per-step logits bit for bit (tolerance 0.0: each step is the same forward on the same shapes), and rows that
finished in the first call stay finished. Against HF's own continuation the tolerance is 0.0 as well: the same
ops in the same order as HF's cached steps (docs/numerics.md §1.5).
"""

import copy

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import lens_det
from tests.helpers import ALL, batch

PROMPT = 8


def cache_state(cache):
    return ([(e.start, e.keys, e.values) for e in cache.layers], cache.mask, cache.tokens)


def assert_same_cache(a, b):
    assert_same_state(cache_state(a), cache_state(b))


def assert_same_state(a, b):
    (la, ma, ta), (lb, mb, tb) = a, b
    assert torch.equal(ma, mb) and torch.equal(ta, tb)
    for (sa, ka, va), (sb, kb, vb) in zip(la, lb):
        assert sa == sb and (ka is None) == (kb is None)
        if ka is not None:
            assert torch.equal(ka, kb) and torch.equal(va, vb)


def two_calls(model, tokens, mask, first, total, pass_mask, **kwargs):
    a = model.generate(tokens, mask, max_new_tokens=first, return_cache=True, **kwargs)
    b = model.generate(a.tokens, a.attention_mask if pass_mask else None, max_new_tokens=total - first,
                       kv_cache=a.kv_cache, return_cache=True, **kwargs)
    return a, b


@pytest.mark.parametrize("pass_mask", [True, False], ids=["out.attention_mask", "mask=None"])
@pytest.mark.parametrize("name", ALL)
def test_two_calls_equal_one_call(model_pair, name, pass_mask):
    """A left-padded batch generated 3 + 4 tokens equals 7 in one call: tokens, mask, every step's logits and
    the final cache, bit for bit. (Before: the whole sequence was appended to the cache again, pads as real.)"""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    one = model.generate(tokens, mask, max_new_tokens=7, stop_tokens=[], return_cache=True)
    a, b = two_calls(model, tokens, mask, 3, 7, pass_mask, stop_tokens=[])
    assert torch.equal(b.tokens, one.tokens) and torch.equal(b.attention_mask, one.attention_mask)
    assert len(a.logits) + len(b.logits) == len(one.logits) == 7
    assert all(torch.equal(x, y) for x, y in zip(a.logits + b.logits, one.logits))
    assert_same_cache(b.kv_cache, one.kv_cache)


@pytest.mark.parametrize("first", range(1, 7))
def test_rows_finished_in_the_first_call_stay_finished(model_pair, first):
    """Rows that hit a stop token in call 1 keep getting the pad token in call 2, as in one call; split at every
    step, so the pending token of a finished row is its stop token (it finished on call 1's last step) or a pad."""
    _, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    free = model.generate(tokens, mask, max_new_tokens=7, stop_tokens=[]).tokens[:, PROMPT:]
    stops = [int(free[0, 1]), int(free[1, 3])]  # row 0 stops at step 1, row 1 by step 3
    kwargs = dict(stop_tokens=stops, pad_token_id=0)
    one = model.generate(tokens, mask, max_new_tokens=7, **kwargs)
    assert (one.tokens[0, PROMPT + 2:] == 0).all() and (one.tokens[1, PROMPT + 4:] == 0).all()
    a, b = two_calls(model, tokens, mask, first, 7, True, **kwargs)
    assert torch.equal(b.tokens, one.tokens)
    assert all(torch.equal(x, y) for x, y in zip(a.logits + b.logits, one.logits))
    assert torch.equal(b.finished, one.finished)


def test_a_continuation_of_finished_rows_runs_nothing(model_pair):
    """Every row finished in call 1: call 2 returns the sequence as it was, runs no forward (no logits) and leaves
    the cache as it was, as one call would have stopped there."""
    _, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    first = model.generate(tokens, mask, max_new_tokens=1, stop_tokens=[]).tokens[:, -1].tolist()
    one = model.generate(tokens, mask, max_new_tokens=5, stop_tokens=first)
    a, b = two_calls(model, tokens, mask, 1, 5, True, stop_tokens=first)
    assert torch.equal(one.tokens, a.tokens) and torch.equal(b.tokens, a.tokens) and b.logits == []
    assert b.kv_cache.length == PROMPT and b.finished.all()


def test_new_tokens_after_a_finished_generation_restart_every_row(model_pair):
    """A new turn (tokens after the pending one) is new input: every row generates again, as HF's continuation."""
    hf, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    stop = int(model.generate(tokens, mask, max_new_tokens=1, stop_tokens=[]).tokens[0, -1])
    a = model.generate(tokens, mask, max_new_tokens=3, stop_tokens=[stop], pad_token_id=0, return_cache=True)
    assert a.finished[0]
    turn = torch.tensor([[5, 6], [7, 8], [9, 10]])
    b = model.generate(torch.cat([a.tokens, turn], 1), None, max_new_tokens=4, stop_tokens=[], kv_cache=a.kv_cache)
    with torch.no_grad():
        ref_a = hf.generate(tokens, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=stop,
                            pad_token_id=0, return_dict_in_generate=True)
        full = torch.cat([mask, torch.ones(3, 5, dtype=torch.long)], 1)  # HF's mask grows by ones, pads too
        ref = hf.generate(torch.cat([ref_a.sequences, turn], 1), attention_mask=full,
                          past_key_values=ref_a.past_key_values, max_new_tokens=4, do_sample=False,
                          eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(a.tokens, ref_a.sequences)
    assert torch.equal(b.tokens, ref.sequences) and not b.finished.any()
    assert all(torch.equal(x, y) for x, y in zip(b.logits, ref.logits))


def hf_continue(hf, tokens, mask, first, rest, extra=None):
    kw = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        a = hf.generate(tokens, attention_mask=mask, max_new_tokens=first, **kw)
        seq = a.sequences if extra is None else torch.cat([a.sequences, extra], 1)
        full = torch.cat([mask, torch.ones(len(seq), seq.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        b = hf.generate(seq, attention_mask=full, past_key_values=a.past_key_values, max_new_tokens=rest, **kw)
    return a, b


@pytest.mark.parametrize("extra", [False, True], ids=["continue", "new-turn"])
@pytest.mark.parametrize("name", ALL)
def test_continuation_equals_hf_past_key_values(model_pair, name, extra):
    """HF `generate(sequences, attention_mask=..., past_key_values=cache)` against lens_det's continuation from
    the same output, with and without two new tokens appended: tokens and logits bit for bit."""
    hf, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    turn = torch.tensor([[5, 6], [7, 8], [9, 10]]) if extra else None
    ref_a, ref_b = hf_continue(hf, tokens, mask, 3, 4, turn)
    a = model.generate(tokens, mask, max_new_tokens=3, stop_tokens=[], return_cache=True)
    seq = a.tokens if turn is None else torch.cat([a.tokens, turn], 1)
    full = torch.cat([a.attention_mask, torch.ones(3, seq.shape[1] - a.tokens.shape[1], dtype=torch.long)], 1)
    b = model.generate(seq, full, max_new_tokens=4, stop_tokens=[], kv_cache=a.kv_cache)
    assert torch.equal(a.tokens, ref_a.sequences) and torch.equal(b.tokens, ref_b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits + b.logits, ref_a.logits + ref_b.logits))


def test_output_of_a_new_tokens_continuation_passes_back(model_pair):
    """After a prefill by hand, generate(new tokens, kv_cache=cache) returns those tokens plus the generated ones
    (HF's `sequences`) and the whole history's mask; passing both back continues: the tokens the cache holds
    are checked against it and skipped. Two calls (3 + 4) equal one call of 7 on the same prefill, bit for bit."""
    _, model = model_pair("tiny-gemma3")
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    caches = [model.new_cache(), model.new_cache()]
    with torch.no_grad():
        for cache in caches:
            model(tokens[:, :6], attention_mask=mask[:, :6], position_ids="mask", kv_cache=cache)
    whole = model.generate(tokens[:, 6:], max_new_tokens=7, stop_tokens=[], kv_cache=caches[0])
    a = model.generate(tokens[:, 6:], max_new_tokens=3, stop_tokens=[], kv_cache=caches[1])
    b = model.generate(a.tokens, a.attention_mask, max_new_tokens=4, stop_tokens=[], kv_cache=caches[1])
    assert torch.equal(b.tokens, whole.tokens) and torch.equal(b.attention_mask, whole.attention_mask)
    assert all(torch.equal(x, y) for x, y in zip(a.logits + b.logits, whole.logits))
    assert_same_cache(caches[0], caches[1])


def test_pad_ids_at_cached_positions_are_never_compared(model_pair):
    """A pad's id is never read, so the whole sequence with other ids at its pads still continues the cache."""
    _, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    one = model.generate(tokens, mask, max_new_tokens=5, stop_tokens=[])
    a = model.generate(tokens, mask, max_new_tokens=2, stop_tokens=[], return_cache=True)
    sequence = a.tokens.masked_fill(a.attention_mask == 0, 99)
    b = model.generate(sequence, None, max_new_tokens=3, stop_tokens=[], kv_cache=a.kv_cache)
    assert torch.equal(b.tokens[:, :PROMPT], sequence[:, :PROMPT])  # the given tokens, as given
    assert torch.equal(b.tokens[:, PROMPT:], one.tokens[:, PROMPT:])
    assert all(torch.equal(x, y) for x, y in zip(a.logits + b.logits, one.logits))


def test_a_mask_runs_a_copy_of_the_history_again(model_pair):
    """The advice of the 'none is new' error: with the mask of the history plus ones, the tokens are all new."""
    _, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens, attention_mask=mask, position_ids="mask", kv_cache=cache)
    with pytest.raises(ValueError, match="none is new"):
        model.generate(tokens, kv_cache=cache, max_new_tokens=2, stop_tokens=[])
    out = model.generate(tokens, torch.cat([cache.mask, torch.ones_like(tokens)], 1), kv_cache=cache,
                         max_new_tokens=2, stop_tokens=[])
    assert cache.length == 2 * PROMPT + 1 and torch.equal(cache.tokens[:, PROMPT:2 * PROMPT], tokens)
    assert torch.equal(out.tokens[:, :PROMPT], tokens)


def test_the_cache_remembers_its_tokens(model_pair):
    _, model = model_pair("tiny-bloom")
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens[:, :5], attention_mask=mask[:, :5], kv_cache=cache)
        model(tokens[:, 5:], attention_mask=mask, kv_cache=cache)
    assert torch.equal(cache.tokens, tokens) and torch.equal(cache.clone().tokens, tokens)


def _pad_less_model():
    cfg = Gemma2Config(vocab_size=128, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, attn_implementation="eager",
                       pad_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return lens_det.from_hf_model(Gemma2ForCausalLM(cfg).eval())


def test_finished_rows_without_a_pad_token_are_refused():
    """Call 1 stopped row 0 (padding with its stop token, the default); call 2 has no stop tokens, no pad token and
    the config has none, so there is nothing to continue row 0 with: refused, naming the argument to pass."""
    model = _pad_less_model()
    tokens = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    stop = int(model.generate(tokens, max_new_tokens=1).tokens[0, -1])
    a = model.generate(tokens, max_new_tokens=2, stop_tokens=[stop], return_cache=True)
    before = copy.deepcopy(cache_state(a.kv_cache))
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] finished.*pass pad_token_id="):
        model.generate(a.tokens, kv_cache=a.kv_cache, max_new_tokens=2)
    assert_same_state(before, cache_state(a.kv_cache))
    b = model.generate(a.tokens, kv_cache=a.kv_cache, max_new_tokens=2, pad_token_id=stop)
    assert (b.tokens[0, 6:] == stop).all()


# --- TransformerLens's freq_penalty ---
def _counts(tokens, mask, d_vocab):
    return torch.zeros(len(tokens), d_vocab).scatter_add_(1, tokens, mask.float())


def test_freq_penalty_subtracts_count_times_penalty_from_the_scaled_logits(model_pair):
    """TransformerLens 2.x `sample_logits`: logits / temperature - freq_penalty * (count of each id in the sequence
    so far: prompt and generated tokens), before top-k / top-p and sampling; a sampling knob only. Left pads are
    not counted here (TransformerLens counts the pad ids of its padded batch). top_k=1 makes the draw the argmax of
    the penalised scores, so each token is checked against a hand computation from the returned logits
    (exactly: the same float32 ops)."""
    _, model = model_pair("tiny-gemma")
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    plain = model.generate(tokens, mask, max_new_tokens=6, stop_tokens=[])
    tokens[0, :5] = plain.tokens[0, PROMPT]  # row 0's pads hold its unpenalised first token: must not count
    kwargs = dict(do_sample=True, top_k=1, temperature=0.7, freq_penalty=0.9, stop_tokens=[])
    out = model.generate(tokens, mask, max_new_tokens=6, **kwargs)
    assert not torch.equal(out.tokens, plain.tokens)  # the penalty changes the text
    assert out.tokens[0, PROMPT] == plain.tokens[0, PROMPT]  # the pad ids did not penalise it
    for step, logits in enumerate(out.logits):
        n = PROMPT + step
        scores = logits.float() / 0.7 - 0.9 * _counts(out.tokens[:, :n], out.attention_mask[:, :n], model.cfg.d_vocab)
        assert torch.equal(scores.argmax(-1), out.tokens[:, n])
    a, b = two_calls(model, tokens, mask, 2, 6, False, **kwargs)  # the history in the cache counts too
    assert torch.equal(b.tokens, out.tokens)
