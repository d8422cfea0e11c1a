"""The determinism contract: in deterministic mode a prompt's logits and every hook point are bitwise identical
across batch composition (1..16, with padding), prefill chunk sizes, cache on/off, repeated runs and thread
counts 1-4. Tolerance 0.0 by contract. An injected batch- or chunk-dependent edit shows the checks see what
they claim to. test_audit.py checks the same op by op, under each CPU capability level."""

import pytest
import torch

import lens_det
from lens_det.determinism import (batch_invariance, cache_invariance, check_all, chunk_invariance,
                                  thread_invariance)
from tests.helpers import ALL, DTYPES, batch

PROMPT = torch.randint(0, 128, (5,), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ALL)
def test_deterministic_mode_is_bitwise_invariant(model_pair, name, dtype):
    _, model = model_pair(name, dtype)
    with lens_det.deterministic():
        reports = check_all(model, PROMPT, batch_sizes=(2, 3, 5, 8, 16), chunk_sizes=(1, 2, 3, None))
    for check, report in reports.items():
        assert report.passed and report.max_abs() == 0.0, f"{check}:\n{report.to_text()}"
        assert report.n_hooks == len(model.hook_dict) - len(model.disabled_hook_points())


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma3"])
def test_checks_catch_and_locate_an_injected_dependence(model_pair, name):
    """The checks have teeth on every machine: a hook whose edit depends on the batch size (or on the number of
    new tokens in the call) is caught by the batch (chunk, cache) check and named as the first divergence."""
    _, model = model_pair(name)
    hook_name = "blocks.1.mlp.hook_post"

    def by_batch(x, hook):
        return x + 1e-6 * (x.shape[0] - 1)

    def by_call_length(x, hook):
        return x + 1e-6 * (x.shape[1] - 1)

    with lens_det.deterministic():
        with model.hooks(fwd_hooks=[(hook_name, by_batch)]):
            batch_report = batch_invariance(model, PROMPT, batch_sizes=(2,))
        with model.hooks(fwd_hooks=[(hook_name, by_call_length)]):
            chunk_report = chunk_invariance(model, PROMPT, chunk_sizes=(2,))
            cache_report = cache_invariance(model, PROMPT, prefill=2)
    for report in (batch_report, chunk_report, cache_report):
        assert not report.passed and report.max_abs() > 0
        assert report.first_divergence.hook == hook_name and report.first_divergence.layer == 1
    assert "op: activation" in batch_report.to_text()


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_thread_counts_one_to_four_are_bitwise_equal(model_pair, dtype):
    _, model = model_pair("tiny-gemma3", dtype)
    tokens, mask = batch("left", model.cfg.d_vocab)
    with lens_det.deterministic():
        report = thread_invariance(model, tokens, threads=(1, 2, 3, 4), attention_mask=mask)
    assert {r.step for r in report.rows} == {f"threads:{n}" for n in (1, 2, 3, 4)}
    assert report.passed and report.max_abs() == 0.0, report.to_text()


def test_cli_reports_what_it_ran_under(capsys):
    from lens_det.cli import main

    assert main(["determinism", "--model", "tiny-gemma", "--dtype", "bfloat16", "--threads", "1", "3"]) == 0
    out = capsys.readouterr().out
    assert f"CPU capability {torch.backends.cpu.get_cpu_capability()}" in out and "[1, 3] threads" in out
    assert "deterministic mode: bitwise invariant" in out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["mid-bloom", "mid-gemma2", "mid-gemma3", "mid-gemma4"])
def test_deterministic_mode_at_benchmark_sizes(name, dtype):
    """Real-model widths (d_model 1024, d_mlp 4096, vocab 8192): elementwise ops cross ATen's parallel grain."""
    model = lens_det.from_config(name, seed=0).to(dtype)
    prompt = torch.randint(0, model.cfg.d_vocab, (24,), generator=torch.Generator().manual_seed(0))
    with lens_det.deterministic():
        reports = check_all(model, prompt, batch_sizes=(2, 5, 16), chunk_sizes=(1, 3, None))
    for check, report in reports.items():
        assert report.passed and report.max_abs() == 0.0, f"{name} {check}:\n{report.to_text()}"


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


def test_plot_checks_writes_exact_zeros_as_text_not_as_bars():
    import matplotlib.pyplot as plt

    from lens_det.determinism import plot_checks
    from lens_det.parity.report import HookDiff, ParityReport, Schedule

    def report(diff):
        row = HookDiff("s", "hook_embed", None, diff, diff, not diff, True)
        return ParityReport("r", Schedule(1, 0), 0.0, 0.0, [row])

    fig = plot_checks({"default": {"batch": report(0.0), "chunk": report(3e-6)},
                       "deterministic": {"batch": report(0.0), "chunk": report(0.0)}})
    ax = fig.axes[0]
    assert len(ax.patches) == 1 and ax.patches[0].get_y() + ax.patches[0].get_height() == pytest.approx(3e-6)
    assert sorted(t.get_text() for t in ax.texts) == ["0 = bit-identical"] * 3 + ["3e-06"]
    assert ax.get_ylim()[0] <= 3e-8  # two decades below the smallest non-zero value
    plt.close(fig)
