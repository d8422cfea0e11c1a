"""Cached decoding equals HF's cached run bit for bit, step by step, on every hook of the new positions.

Tolerance 0.0 against HF's cached run with the same chunking: the same ops on the same shapes in the same order
(docs/numerics.md §1.5, §7). Against lens_det's own uncached run the shapes differ (prefill [T x T] vs decode
[1 x K] matmuls), so that comparison has a stated tolerance; bitwise equality there is the deterministic mode's.
"""

import pytest
import torch

import lens_det
from lens_det.parity import compare
from tests.helpers import ALL, DTYPES, batch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("name", ALL)
def test_cached_steps_bit_identical_to_hf(model_pair, name, chunk, dtype):
    hf, model = model_pair(name, dtype)
    tokens, mask = batch("left", model.cfg.d_vocab, length=16)  # >= 3 windows of 4-5 for Gemma 2/3
    positions = lens_det.positions_from_mask(mask) if model.cfg.positional == "rope" else None
    report = compare(model, hf, tokens, mask, positions, prefill=5, chunk=chunk)
    steps = {r.step for r in report.rows if r.step.startswith("cached")}
    assert len(steps) == 1 + 11 // chunk
    n_hooks = len(model.hook_dict) - len(model.disabled_hook_points())  # every hook but the opt-in ones
    assert report.n_hooks == n_hooks and len(report.rows) == (1 + len(steps)) * (n_hooks + 1)
    assert report.passed and report.max_abs() == 0.0, report.to_text()


@pytest.mark.parametrize("name", ALL)
def test_chunked_prefill_same_tokens_and_bounded_hook_gap(model_pair, name):
    """Chunk sizes 1, 3, 7 and all-at-once end in the same greedy tokens; per hook, cached vs uncached differs
    at most at fp32 rounding level (HF itself: ~1e-6..1e-4 here, docs/numerics.md §7) at real tokens. Stated
    tolerance: 1e-4 times the hook's magnitude. Left-pad positions are excluded: a fully masked query attends
    uniformly to every key present (HF eager, docs/numerics.md §1.3), and how many keys are present depends on chunking.
    """
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab, length=15)
    with torch.no_grad():
        _, full = model.run_with_cache(tokens, attention_mask=mask, position_ids="mask")
    ends = set()
    for chunk in (1, 3, 7, 15):
        cache = model.new_cache()
        pieces = {}
        for a in range(0, 15, chunk):
            b = min(a + chunk, 15)
            with torch.no_grad():
                logits, acts = model.run_with_cache(tokens[:, a:b], attention_mask=mask[:, :b],
                                                    position_ids="mask", kv_cache=cache)
            for key in ("blocks.1.hook_resid_post", "blocks.0.attn.hook_z", "ln_final.hook_normalized"):
                pieces.setdefault(key, []).append(acts[key])
        ends.add(tuple(logits[:, -1].argmax(-1).tolist()))
        for key, parts in pieces.items():
            real = mask.bool()
            got, want = torch.cat(parts, dim=1)[real], full[key][real]
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (chunk, key)
    assert len(ends) == 1


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma4", "tiny-gemma4-ple", "tiny-gemma3n"])
def test_cache_stores_what_hf_keeps(model_pair, name):
    """Sliding layers keep W - 1 positions, full layers everything; keys are post-RoPE (and post k-norm), values
    post v-norm (Gemma 4), each layer with its own kv heads and head dim. KV-sharing consumer layers store nothing
    (HF: a DummyLayer)."""
    hf, model = model_pair(name)
    tokens, mask = batch("none", model.cfg.d_vocab, length=16)
    from transformers import DynamicCache

    hf_cache, cache = DynamicCache(config=hf.config), model.new_cache()
    with torch.no_grad():
        hf(tokens, attention_mask=mask, past_key_values=hf_cache, use_cache=True)
        model(tokens, attention_mask=mask, kv_cache=cache)
    for i, (ours, theirs) in enumerate(zip(cache.layers, hf_cache.layers)):
        if model.cfg.layer_kv_source(i) is not None:
            assert type(theirs).__name__ == "DummyLayer" and ours.keys is None and ours.nbytes == 0
            continue
        expected = 16 if model.cfg.layer_types[i] == "full_attention" else model.cfg.sliding_window - 1
        assert ours.length == expected
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma2", "tiny-gemma3", "tiny-gemma4", "tiny-gemma4-ple",
                                  "tiny-gemma3n"])
def test_cache_bytes_formula(model_pair, name):
    """2 x layers x batch x stored positions x kv_heads x d_head x itemsize, sliding layers storing W - 1,
    KV-sharing consumer layers storing nothing (only the layers that project keys/values count)."""
    for dtype in DTYPES:
        _, model = model_pair(name, dtype)
        tokens, _ = batch("none", model.cfg.d_vocab, batch_size=2, length=12)
        cache = model.new_cache()
        with torch.no_grad():
            model(tokens, kv_cache=cache)
        c = model.cfg
        stored = [0 if c.layer_kv_source(i) is not None else 12 if t == "full_attention"
                  else min(12, c.sliding_window - 1) for i, t in enumerate(c.layer_types)]
        itemsize = torch.empty((), dtype=dtype).element_size()
        assert cache.nbytes == sum(2 * 2 * s * c.layer_n_key_value_heads(i) * c.layer_d_head(i) * itemsize
                                   for i, s in enumerate(stored))
        assert f"bytes={cache.nbytes}" in repr(cache) and "tokens_seen=12" in repr(cache)
