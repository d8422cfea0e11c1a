"""Eager attention over query chunks equals eager attention over all queries at once, bit for bit.

The eager core runs EAGER_QUERY_CHUNK query rows at a time when no hook needs the whole pattern, so memory grows
with T x chunk instead of T x T. Tolerance 0.0: every op is row-wise (the GEMMs under MKL's strict
reproducibility mode, which the op audit checks on the running machine; softmax and the mask add per row). The
one op that is not row-wise in the HF-exact path, an attention soft-cap's tanh, keeps that layer unchunked
(Gemma 2, VaultGemma), except in deterministic mode, whose ops are layout-invariant by design. Here the chunk
is set to 8 rows (and the shortest chunk to 8) so that 40-token prompts run several chunks; the real sizes (256,
16) run the same code. Measured limits of the row-wise property on MKL's strict mode: GEMMs of 1-3 rows take a
matrix-vector kernel that rounds differently (so query_chunks never makes a chunk that short), and so do tiny
all-at-once shapes (d_head 8 with 8 keys and 4 rows); real chunks have >= 257 keys, so neither can occur.
"""

import pytest
import torch

import lens_det
from lens_det.components import attention
from lens_det.parity.models import random_hf_model
from tests.helpers import ALL, DTYPES, batch

SOFTCAPPED = {"tiny-gemma2", "tiny-vaultgemma"}


def _run(model, tokens, mask, chunk, monkeypatch, cached=False):
    """(logits, every hook but the pattern hooks, number of eager core calls) with the given chunk size."""
    monkeypatch.setattr(attention, "EAGER_QUERY_CHUNK", chunk)
    monkeypatch.setattr(attention, "MIN_CHUNK_ROWS", 8)
    calls = []
    original = attention.Attention._eager_rows
    monkeypatch.setattr(attention.Attention, "_eager_rows", lambda self, *a: calls.append(1) or original(self, *a))
    names = lambda n: not n.endswith(("hook_attn_scores", "hook_pattern"))  # noqa: E731 - they keep a layer whole
    with torch.no_grad():
        if not cached:
            logits, acts = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
            return logits, dict(acts.items()), len(calls)
        cache = model.new_cache()  # a 24-token prefill (3 chunks of 8), then 16 tokens (2 chunks) after it
        first, a = model.run_with_cache(tokens[:, :24], attention_mask=mask[:, :24], kv_cache=cache, names_filter=names)
        second, b = model.run_with_cache(tokens[:, 24:], attention_mask=mask, kv_cache=cache, names_filter=names)
        return torch.cat([first, second], 1), {**{k: v for k, v in a.items()}, **{k + "@2": v for k, v in b.items()}}, \
            len(calls)


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ALL)
def test_query_chunks_bit_identical(model_pair, monkeypatch, name, dtype, cached):
    _, model = model_pair(name, dtype)
    tokens, mask = batch("left", model.cfg.d_vocab, length=40)
    whole_logits, whole, whole_calls = _run(model, tokens, mask, 10_000, monkeypatch, cached)
    logits, chunked, calls = _run(model, tokens, mask, 8, monkeypatch, cached)
    if name in SOFTCAPPED:
        assert calls == whole_calls  # tanh is not row-wise: those layers stay whole
    else:
        assert calls > whole_calls  # the chunked path really ran
    assert torch.equal(logits, whole_logits)
    assert chunked.keys() == whole.keys()
    for key in whole:
        assert torch.equal(chunked[key], whole[key]), key


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-bloom", "tiny-gemma4-ple"])
def test_query_chunks_in_deterministic_mode(model_pair, monkeypatch, name):
    """Deterministic mode chunks every family (soft-caps included): its ops do not depend on the layout."""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab, length=40)
    with lens_det.deterministic():
        whole_logits, whole, whole_calls = _run(model, tokens, mask, 10_000, monkeypatch)
        logits, chunked, calls = _run(model, tokens, mask, 8, monkeypatch)
    assert calls > whole_calls
    assert torch.equal(logits, whole_logits)
    for key in whole:
        assert torch.equal(chunked[key], whole[key]), key


def test_query_chunks_never_leave_a_short_remainder():
    assert attention.query_chunks(600, 256) == [slice(0, 256), slice(256, 512), slice(512, 600)]
    assert attention.query_chunks(520, 256) == [slice(0, 256), slice(256, 520)]  # 8 rows join the last chunk
    assert attention.query_chunks(100, 256) == [slice(0, 100)]
    for n in range(1, 700, 7):
        chunks = attention.query_chunks(n, 256)
        assert chunks[0].start == 0 and chunks[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
        assert all(c.stop - c.start >= min(n, attention.MIN_CHUNK_ROWS) for c in chunks)


def test_a_pattern_hook_keeps_its_layer_whole(model_pair, monkeypatch):
    _, model = model_pair("tiny-gemma3")
    tokens, mask = batch("left", model.cfg.d_vocab)
    monkeypatch.setattr(attention, "EAGER_QUERY_CHUNK", 4)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter="blocks.0.attn.hook_pattern")
    assert cache["blocks.0.attn.hook_pattern"].shape[-2:] == (16, 16)


def test_chunked_memory_grows_with_the_chunk():
    """The point of chunking: the largest attention tensor is [batch, head, chunk, keys], not [.., T, T]. Measured
    as the largest tensor the eager core allocates for a 1024-token prompt (a torch dispatch mode sees them all)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                Largest.largest = max(Largest.largest, out.numel())
            return out

    model = lens_det.from_hf_model(random_hf_model("tiny-gemma3"))
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 1024))
    with torch.no_grad(), Largest():
        model(tokens)
    heads = model.cfg.n_heads
    assert Largest.largest < heads * 1024 * 1024 / 2  # one full [head, T, T] score tensor would be this x 2
    assert Largest.largest >= heads * attention.EAGER_QUERY_CHUNK * 1024  # a [head, chunk, T] tensor exists
