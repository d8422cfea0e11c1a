"""The determinism contract: in deterministic mode a prompt's logits and every hook point are bitwise identical
across batch composition (1..16, with padding), prefill chunk sizes, cache on/off and repeated runs (fixed
thread count). Tolerance 0.0 by contract. In the default (HF-exact) mode the same checks report non-zero
float32 differences, which shows they see what they claim to."""

import pytest
import torch

import lens_det
from lens_det.determinism import (batch_invariance, cache_invariance, check_all, chunk_invariance, run_to_run,
                                  thread_invariance)
from tests.conftest import ALL, DTYPES, batch

PROMPT = torch.randint(0, 128, (5,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ALL)
def test_deterministic_mode_is_bitwise_invariant(model_pair, name, dtype):
    _, model = model_pair(name, dtype)
    with lens_det.deterministic():
        reports = check_all(model, PROMPT, batch_sizes=(2, 3, 5, 8, 16), chunk_sizes=(1, 2, 3, None))
    for check, report in reports.items():
        assert report.passed and report.max_abs() == 0.0, f"{check}:\n{report.to_text()}"
        assert report.n_hooks == len(model.hook_dict) - model.cfg.n_layers


@pytest.mark.parametrize("name", ALL)
def test_default_mode_checks_see_the_differences(model_pair, name):
    """float32, default mode: a short prompt alone takes the small-matrix BLAS path, decode steps multiply
    other shapes than the prefill; the checks report it and name the first hook and op."""
    _, model = model_pair(name)
    batch_report = batch_invariance(model, PROMPT, batch_sizes=(2, 4))
    cache_report = cache_invariance(model, PROMPT, prefill=2)
    for report in (batch_report, cache_report):
        assert not report.passed and report.max_abs() > 0
        first = report.first_divergence
        assert first.hook == "blocks.0.attn.hook_q" and first.layer == 0  # the first GEMM of the model
    assert "op: linear" in batch_report.to_text()
    assert run_to_run(model, PROMPT).passed  # each kernel is deterministic run to run at a fixed thread count


def test_model_setting_equals_context_manager(model_pair):
    _, model = model_pair("tiny-gemma3")
    tokens, mask = batch("left", model.cfg.d_vocab)
    with torch.no_grad(), lens_det.deterministic():
        a = model(tokens, attention_mask=mask, position_ids="mask")
    model.deterministic = True
    try:
        with torch.no_grad():
            b = model(tokens, attention_mask=mask, position_ids="mask")
        c = chunk_invariance(model, tokens, mask, chunk_sizes=(1, 4))
    finally:
        model.deterministic = False
    assert torch.equal(a, b) and c.passed
    assert not lens_det.ops.is_deterministic()


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma2"])
def test_deterministic_greedy_generation_alone_or_in_any_batch(model_pair, name):
    """Same tokens and per-step logits, bit for bit, for a prompt generated alone or inside batches."""
    _, model = model_pair(name)
    gen = torch.Generator().manual_seed(5)
    with lens_det.deterministic():
        alone = model.generate(PROMPT[None], max_new_tokens=8, stop_tokens=[])
        for size, row in ((2, 1), (5, 0), (16, 9)):
            lengths = torch.randint(1, 14, (size,), generator=gen).tolist()
            lengths[row] = len(PROMPT)
            width = max(lengths)
            tokens = torch.randint(0, model.cfg.d_vocab, (size, width), generator=gen)
            mask = torch.zeros_like(tokens)
            for i, n in enumerate(lengths):
                mask[i, width - n:] = 1
            tokens[row, width - len(PROMPT):] = PROMPT
            out = model.generate(tokens, mask, max_new_tokens=8, stop_tokens=[])
            assert torch.equal(out.tokens[row, width - len(PROMPT):], alone.tokens[0])
            for a, b in zip(out.logits, alone.logits):
                assert torch.equal(a[row], b[0])
            uncached = model.generate(tokens, mask, max_new_tokens=8, stop_tokens=[], use_kv_cache=False)
            assert torch.equal(uncached.tokens, out.tokens)
            assert all(torch.equal(a, b) for a, b in zip(uncached.logits, out.logits))


def test_thread_count_is_reported(model_pair):
    _, model = model_pair("tiny-gemma")
    with lens_det.deterministic():
        report = thread_invariance(model, PROMPT, threads=1)
    assert report.rows and all(r.step == "threads:1" for r in report.rows)


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma2"])
def test_deterministic_mode_never_nan_on_padding_only_rows(model_pair, name):
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    mask[2] = 0  # a row with no real token
    with torch.no_grad(), lens_det.deterministic():
        out = model(tokens, attention_mask=mask, position_ids="mask")
        alone = model(tokens[:1, 5:], position_ids="mask")
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 5:], alone[0])  # the padded row is still its prompt alone, bit for bit
