"""Gemma 4 KV sharing through the KV cache (tiny-gemma4-ple, E2B-style: the last layers read the keys and values
of an earlier layer): cached in chunks equals uncached, consumer layers included. Parity with HF:
tests/parity/test_gemma4.py."""

import pytest

from tests.helpers import batch


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_kv_sharing_cache_on_equals_cache_off(model_pair, chunk):
    """Deterministic mode (batch-invariant ops): every hook of a left-padded batch through the KV cache in
    chunks equals the uncached forward bit for bit, consumer layers included (their keys are their source's
    past + new)."""
    from lens_det.parity import self_parity

    _, model = model_pair("tiny-gemma4-ple")
    tokens, mask = batch("left", model.cfg.d_vocab)
    model.deterministic = True
    try:
        report = self_parity(model, tokens, mask, prefill=4, chunk=chunk, rtol=0.0)
    finally:
        model.deterministic = False
    assert report.passed and report.max_abs() == 0.0, report.to_text()
