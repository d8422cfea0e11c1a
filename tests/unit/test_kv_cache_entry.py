"""Unit tests for lens_det.kv_cache: KVCacheEntry (one layer's keys and values), SharedKVEntry (a KV-sharing
consumer layer) and KVCache (the caller-owned cache). Stored keys and values are compared with HF's own cache
layers (DynamicLayer, DynamicSlidingWindowLayer) fed the same tensors, at tolerance 0.0 (a cache only copies and
slices); bookkeeping (start, length, nbytes, tokens, mask) is compared with the numbers it must have."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from lens_det.kv_cache import KVCache, KVCacheEntry, PendingGeneration, SharedKVEntry

BATCH, HEADS, D = 2, 3, 8
STEPS = [6, 1, 1, 3, 1, 2]  # new positions per forward call: a prefill, decode steps, a chunk


def kv(n: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, HEADS, n, D, generator=gen).to(dtype),
            torch.randn(BATCH, HEADS, n, D, generator=gen).to(dtype))


def history(model, length=10, seed=0):
    """tokens [3, length] and a left-padded 0/1 mask for a cache test."""
    tokens = torch.randint(0, model.cfg.d_vocab, (3, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, length, dtype=torch.long)
    mask[0, :3] = 0
    return tokens, mask


def entry_state(cache: KVCache):
    """Every layer's (start, length, copies of its keys and values), to compare a cache before and after."""
    return [(e.start, e.length, None if e.keys is None else (e.keys.clone(), e.values.clone())) for e in cache.layers]


def assert_same_state(a, b):
    assert len(a) == len(b)
    for (start_a, len_a, kv_a), (start_b, len_b, kv_b) in zip(a, b):
        assert (start_a, len_a) == (start_b, len_b)
        assert (kv_a is None) == (kv_b is None)
        if kv_a is not None:
            assert torch.equal(kv_a[0], kv_b[0]) and torch.equal(kv_a[1], kv_b[1])


# --------------------------------------------------------------------------------------------------------------
# KVCacheEntry
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 4, 2], ids=["full", "sliding4", "sliding2"])
def test_entry_matches_hf_cache_layer_step_by_step(window):
    """Each step: update returns everything to attend (past + new) and the absolute index of its first position;
    commit keeps all (full layer) or the last window - 1 positions (sliding), and start advances by the positions
    dropped. Against HF's DynamicLayer / DynamicSlidingWindowLayer fed the same tensors: the returned keys/values,
    the stored ones, and HF's (kv_length, kv_offset) from get_mask_sizes equal ours. Tolerance 0.0."""
    ours = KVCacheEntry(window)
    hf = DynamicLayer() if window is None else DynamicSlidingWindowLayer(sliding_window=window)
    seen = 0
    for step, n in enumerate(STEPS):
        k, v = kv(n, seed=step)
        kv_length, kv_offset = hf.get_mask_sizes(n)
        k_all, v_all, start = ours.update(k, v)
        hf_k, hf_v = hf.update(k, v)
        assert torch.equal(k_all, hf_k) and torch.equal(v_all, hf_v)
        assert (k_all.shape[-2], start) == (kv_length, kv_offset)
        ours.commit()
        seen += n
        kept = seen if window is None else min(seen, window - 1)
        assert ours.length == kept and ours.start == seen - kept
        assert torch.equal(ours.keys, hf.keys) and torch.equal(ours.values, hf.values)


def test_entry_update_is_staged_until_commit_and_discard_leaves_it_unchanged():
    """update stages; until commit the entry holds what it held. discard drops the staged tensors: the entry is
    unchanged (same tensors, same start) and the next update builds on the committed state. Tolerance 0.0."""
    entry = KVCacheEntry(window=4)
    k1, v1 = kv(5, seed=1)
    k_all, _, start = entry.update(k1, v1)
    assert (entry.keys, entry.values, entry.length, entry.nbytes, start) == (None, None, 0, 0, 0)
    assert torch.equal(k_all, k1) and k_all.data_ptr() != k1.data_ptr()  # a copy, as HF's cat onto an empty cache
    entry.commit()
    keys, values, start = entry.keys, entry.values, entry.start
    assert start == 2 and torch.equal(keys, k1[:, :, 2:])  # window 4 keeps 3 of 5 positions
    k2, v2 = kv(2, seed=2)
    entry.update(k2, v2)
    entry.discard()
    assert entry.keys is keys and entry.values is values and entry.start == start
    k3, v3 = kv(1, seed=3)
    k_all, v_all, start = entry.update(k3, v3)
    assert start == 2 and torch.equal(k_all, torch.cat([k1[:, :, 2:], k3], dim=-2))
    assert torch.equal(v_all, torch.cat([v1[:, :, 2:], v3], dim=-2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_entry_length_and_nbytes(dtype):
    """length = stored positions; nbytes = keys + values bytes: 2 * batch * heads * positions * d_head * itemsize."""
    entry = KVCacheEntry(window=None)
    assert entry.length == 0 and entry.nbytes == 0
    entry.update(*kv(5, seed=0, dtype=dtype))
    entry.commit()
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert entry.length == 5 and entry.nbytes == 2 * BATCH * HEADS * 5 * D * itemsize
    assert entry.keys.dtype == dtype


def test_shared_entry_stores_nothing_and_refuses_updates():
    """A KV-sharing consumer's entry (HF's DummyLayer) holds nothing, counts 0 bytes, and an update names the
    source layer; commit and discard do nothing."""
    entry = SharedKVEntry(source=3)
    assert (entry.keys, entry.values, entry.start, entry.length, entry.nbytes) == (None, None, 0, 0, 0)
    with pytest.raises(RuntimeError, match="layer 3's"):
        entry.update(*kv(1, seed=0))
    entry.commit()
    entry.discard()
    assert entry.length == 0


# --------------------------------------------------------------------------------------------------------------
# KVCache
# --------------------------------------------------------------------------------------------------------------

def test_cache_layers_follow_the_config(model_pair):
    """One entry per layer: sliding layers get the config's window, full layers none, KV-sharing consumers a
    SharedKVEntry naming their source layer."""
    for name in ("tiny-gemma2", "tiny-gemma4-ple"):
        _, model = model_pair(name)
        cfg = model.config
        cache = model.new_cache()
        assert len(cache.layers) == cfg.n_layers
        for i, entry in enumerate(cache.layers):
            source = cfg.layer_kv_source(i)
            if source is not None:
                assert isinstance(entry, SharedKVEntry) and entry.source == source
            else:
                window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None
                assert isinstance(entry, KVCacheEntry) and entry.window == window
        assert (cache.length, cache.batch_size, cache.nbytes, cache.mask, cache.tokens) == (0, None, 0, None, None)


@pytest.fixture(scope="module")
def prefilled(model_pair):
    """(model, tokens, mask, cache): tiny-gemma2 (sliding layers of window 4 and full layers) after a prefill of the
    first 6 of 10 left-padded tokens. Tests take `cache.clone()` and leave this one as it is."""
    _, model = model_pair("tiny-gemma2")
    tokens, mask = history(model)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens[:, :6], attention_mask=mask[:, :6], kv_cache=cache)
    return model, tokens, mask, cache


def test_forward_records_tokens_mask_and_trims_sliding_layers(prefilled):
    """After a prefill of 6 and a chunk of 2 tokens: the cache's tokens and mask are the 8 seen (pads included),
    full layers hold 8 positions from index 0, sliding layers the last window - 1 from index 8 - (window - 1), and
    nbytes is their sum (2 tensors * batch * kv_heads * positions * d_head * 4 bytes). A forward clears a pending
    generation."""
    model, tokens, mask, prefix = prefilled
    cfg = model.config
    cache = prefix.clone()
    cache.pending = PendingGeneration(tokens[:, 5:6], torch.zeros(3, dtype=torch.bool))
    with torch.no_grad():
        model(tokens[:, 6:8], attention_mask=mask[:, :8], kv_cache=cache)
    assert cache.pending is None
    assert torch.equal(cache.tokens, tokens[:, :8]) and torch.equal(cache.mask, mask[:, :8])
    assert (cache.length, cache.batch_size) == (8, 3)
    window = cfg.sliding_window
    expected_bytes = 0
    for i, entry in enumerate(cache.layers):
        kept = window - 1 if cfg.layer_types[i] == "sliding_attention" else 8
        assert (entry.length, entry.start) == (kept, 8 - kept)
        assert entry.keys.shape == (3, cfg.n_key_value_heads, kept, cfg.d_head)
        expected_bytes += 2 * 3 * cfg.n_key_value_heads * kept * cfg.d_head * 4
    assert cache.nbytes == expected_bytes
    assert f"tokens_seen=8, batch=3, stored_positions={sorted({window - 1, 8})}" in repr(cache)


def test_kv_sharing_cache_counts_producer_layers_only(model_pair):
    """With KV sharing, consumer layers store nothing after a forward; nbytes sums the producers."""
    _, model = model_pair("tiny-gemma4-ple")
    tokens, mask = history(model, length=6)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens, attention_mask=mask, kv_cache=cache)
    shared = [e for e in cache.layers if isinstance(e, SharedKVEntry)]
    assert shared and all(e.keys is None and e.length == 0 for e in shared)
    assert cache.nbytes == sum(e.nbytes for e in cache.layers if isinstance(e, KVCacheEntry)) > 0


def test_failed_forward_leaves_the_cache_unchanged(prefilled):
    """Staged commit at the cache level: a hook that raises in the last layer, after every earlier layer staged
    its update, leaves every entry, the mask and the tokens as they were (tolerance 0.0)."""
    model, tokens, mask, prefix = prefilled
    cache = prefix.clone()
    before, mask_before, tokens_before = entry_state(cache), cache.mask, cache.tokens

    def boom(x, hook):
        raise RuntimeError("boom")

    last = model.config.n_layers - 1
    with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{last}.hook_resid_post", boom)]):
        with pytest.raises(RuntimeError, match="boom"):
            model(tokens[:, 6:8], attention_mask=mask[:, :8], kv_cache=cache)
    assert_same_state(entry_state(cache), before)
    assert cache.mask is mask_before and cache.tokens is tokens_before and cache.length == 6


def test_clone_is_independent(prefilled):
    """clone copies every tensor (equal values, other storage) and the pending generation; growing the clone
    leaves the original as it was, and both branches continue to the same logits (the same computation on equal
    caches, tolerance 0.0)."""
    model, tokens, mask, prefix = prefilled
    cache = prefix.clone()
    cache.pending = PendingGeneration(tokens[:, 5:6], torch.tensor([True, False, False]))
    before = entry_state(cache)
    other = cache.clone()
    assert other is not cache and other.max_length == cache.max_length and other.frozen == cache.frozen
    assert_same_state(entry_state(other), before)
    for mine, theirs in zip(cache.layers, other.layers):
        assert theirs.keys.data_ptr() != mine.keys.data_ptr() and theirs.values.data_ptr() != mine.values.data_ptr()
    assert torch.equal(other.tokens, cache.tokens) and other.tokens.data_ptr() != cache.tokens.data_ptr()
    assert torch.equal(other.mask, cache.mask) and other.mask.data_ptr() != cache.mask.data_ptr()
    assert torch.equal(other.pending.finished, cache.pending.finished) and other.pending is not cache.pending
    with torch.no_grad():
        branch = model(tokens[:, 6:8], attention_mask=mask[:, :8], kv_cache=other)
    assert_same_state(entry_state(cache), before)
    assert cache.length == 6 and other.length == 8 and cache.pending is not None
    with torch.no_grad():
        trunk = model(tokens[:, 6:8], attention_mask=mask[:, :8], kv_cache=cache)
    assert torch.equal(branch, trunk)


def test_frozen_cache_is_read_but_never_grown(prefilled):
    """A frozen cache attends to its prefix (the logits equal those of an unfrozen copy, tolerance 0.0: the same
    computation) and stores nothing; unfreeze lets it grow again. freeze/unfreeze return the cache."""
    model, tokens, mask, prefix = prefilled
    cache, growing = prefix.clone(), prefix.clone()
    assert cache.freeze() is cache and cache.frozen
    before = entry_state(cache)
    with torch.no_grad():
        frozen_logits = model(tokens[:, 6:8], attention_mask=mask[:, :8], kv_cache=cache)
        assert_same_state(entry_state(cache), before)
        assert cache.length == 6
        assert torch.equal(frozen_logits, model(tokens[:, 6:8], attention_mask=mask[:, :8], kv_cache=growing))
        assert cache.unfreeze() is cache and not cache.frozen
        model(tokens[:, 6:8], attention_mask=mask[:, :8], kv_cache=cache)
    assert cache.length == 8


def test_to_moves_every_tensor_in_place(prefilled):
    """to(device) moves every layer's keys and values, the mask, the tokens and the pending generation, and
    returns the cache itself. On a CPU-only machine: to('cpu') keeps every value (tolerance 0.0), and to('meta')
    on a clone shows that every tensor moves (and that the original is untouched)."""
    _, tokens, _, prefix = prefilled
    cache = prefix.clone()
    cache.pending = PendingGeneration(tokens[:, 5:6], torch.zeros(3, dtype=torch.bool))
    before = entry_state(cache)
    assert cache.to("cpu") is cache
    assert_same_state(entry_state(cache), before)
    moved = cache.clone()
    assert moved.to("meta") is moved
    tensors = [moved.mask, moved.tokens, moved.pending.tokens, moved.pending.finished]
    tensors += [t for e in moved.layers for t in (e.keys, e.values)]
    assert all(t.device.type == "meta" for t in tensors)
    assert [e.keys.shape for e in moved.layers] == [e.keys.shape for e in cache.layers]
    assert all(e.keys.device.type == "cpu" for e in cache.layers) and cache.mask.device.type == "cpu"


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "8"])
def test_max_length_must_be_a_positive_int(model_pair, bad):
    _, model = model_pair("tiny-gemma2")
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
        KVCache(model.config, max_length=bad)


def test_max_length_refuses_a_call_that_would_exceed_it(model_pair):
    """A cache of max_length 8 holding 6 tokens refuses 3 more before computing anything (the error says what to
    do, the cache is unchanged), and accepts 2 more (exactly 8)."""
    _, model = model_pair("tiny-gemma2")
    tokens, mask = history(model)
    cache = model.new_cache(max_length=8)
    with torch.no_grad():
        model(tokens[:, :6], attention_mask=mask[:, :6], kv_cache=cache)
        before = entry_state(cache)
        fired = []
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: fired.append(hook.name))]):
            with pytest.raises(ValueError, match="exceed its max_length 8; use a larger max_length or a new cache"):
                model(tokens[:, 6:9], attention_mask=mask[:, :9], kv_cache=cache)
        assert fired == []  # refused before the first block ran
        assert_same_state(entry_state(cache), before)
        assert cache.length == 6
        model(tokens[:, 6:8], attention_mask=mask[:, :8], kv_cache=cache)
    assert cache.length == 8
