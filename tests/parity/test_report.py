"""compare() as a product: it finds injected bugs and names where they start; reports; bad input."""

import json
import math

import pytest
import torch

from lens_det.parity import Schedule, assert_parity, compare, faults, self_parity
from lens_det.parity.report import kind_of
from tests.helpers import batch


def first(report):
    assert not report.passed
    d = report.first_divergence
    return d.step, d.layer, kind_of(d.hook), d.position


def test_tl28_bloom_alibi_row0_on_cached_steps_is_caught(model_pair):
    """TransformerLens 2.8: cached steps used row 0 of the ALiBi matrix (the bias of query 0, which is 0 for
    every later key), i.e. no position information once decoding from the cache."""
    hf, model = model_pair("tiny-bloom")
    tokens, mask = batch("left", model.cfg.d_vocab, length=12)
    assert compare(model, hf, tokens, mask, prefill=6).passed
    with faults.alibi_row0_on_cached_steps():
        report = compare(model, hf, tokens, mask, prefill=6)
    assert report.max_abs(cached=False) == 0.0  # the uncached run is unaffected
    assert first(report) == ("cached:1", 0, "attn.hook_attn_scores", 6)
    assert compare(model, hf, tokens, mask, prefill=6).passed  # restored on exit


def test_rope_offset_off_by_one_after_the_cache_is_caught(model_pair):
    hf, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab, length=12)
    with faults.rope_offset_after_cache(1):
        assert first(compare(model, hf, tokens, mask, "mask", prefill=6)) == ("cached:1", 0, "attn.hook_rot_q", 6)


def test_sliding_window_off_by_one_is_caught(model_pair):
    hf, model = model_pair("tiny-gemma2")
    tokens, mask = batch("none", model.cfg.d_vocab, length=12)
    with faults.sliding_window_off_by_one(model, layer=2):  # layer 2 slides (even layers)
        # query `window` is the first that sees one key too many
        assert first(compare(model, hf, tokens, mask, prefill=6)) == \
            ("uncached", 2, "attn.hook_attn_scores", model.cfg.sliding_window)
    with pytest.raises(ValueError, match="not a sliding-window layer"):
        faults.sliding_window_off_by_one(model, layer=1)


def test_mask_that_ignores_padding_is_caught(model_pair):
    hf, model = model_pair("tiny-gemma3")
    tokens, mask = batch("left", model.cfg.d_vocab, length=12)
    with faults.mask_ignores_padding():
        assert first(compare(model, hf, tokens, mask, "mask", prefill=6)) == \
            ("uncached", 0, "attn.hook_attn_scores", 0)


def test_wrong_attention_scale_in_one_layer_is_caught(model_pair):
    hf, model = model_pair("tiny-gemma3")
    tokens, mask = batch("none", model.cfg.d_vocab, length=10)
    with faults.wrong_attention_scale(model, layer=3):
        report = compare(model, hf, tokens, mask, prefill=5)
    assert first(report) == ("uncached", 3, "attn.hook_attn_scores", 0)
    assert report.first_divergence.head == 0


def test_report_text_json_plot(model_pair, tmp_path):
    hf, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab, length=10)
    report = compare(model, hf, tokens, mask, "mask", prefill=4, decode_steps=3, chunk=2)
    assert report.schedule == Schedule(4, 3, 2) and report.coverage == 1.0 and report.passed
    text = report.to_text()
    n = len(model.hook_dict) - len(model.disabled_hook_points())  # opt-in hooks
    assert "PASS" in text and f"coverage: {n}/{n}" in text and "prefill 4, 3 decode steps of 2" in text
    report.save_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] and len(data["rows"]) == 5 * (n + 1) and data["first_divergence"] is None
    report.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_assert_parity_message_names_the_first_divergence(model_pair, monkeypatch):
    hf, model = model_pair("tiny-gemma")
    tokens, mask = batch("none", model.cfg.d_vocab, length=8)
    assert_parity(model, hf, tokens, attention_mask=mask)
    monkeypatch.setattr(model.blocks[1].mlp, "act", lambda x: torch.nn.functional.gelu(x))  # erf, not tanh
    with pytest.raises(AssertionError, match=r"first divergence: uncached, layer 1, mlp.hook_post"):
        assert_parity(model, hf, tokens, attention_mask=mask)


def test_self_parity_cached_vs_uncached(model_pair):
    _, model = model_pair("tiny-gemma3")
    tokens, mask = batch("left", model.cfg.d_vocab, length=14)
    report = self_parity(model, tokens, mask, prefill=5, chunk=3)
    assert report.passed, report.to_text()  # default mode: within rtol 1e-4 of each hook's scale
    assert 0 < report.max_abs() < 1e-3  # fp32 prefill-vs-decode shapes: rounding, not zero (HF: same)
    exact = self_parity(model, tokens, mask, prefill=5, chunk=3, rtol=0.0)
    assert not exact.passed  # the check can see the rounding differences it claims to


def test_bad_input_fails_before_compute(model_pair, monkeypatch):
    hf, model = model_pair("tiny-gemma2")
    other_hf, _ = model_pair("tiny-gemma3")
    tokens, mask = batch("none", model.cfg.d_vocab, length=8)
    monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: pytest.fail("computed before validating"))
    with pytest.raises(ValueError, match="different architecture or vocabulary"):
        compare(model, other_hf, tokens, mask)
    with pytest.raises(ValueError, match="needs 12 tokens .*only 8"):
        compare(model, hf, tokens, mask, prefill=4, decode_steps=4, chunk=2)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 7\)"):
        compare(model, hf, tokens, mask[:, 1:])


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma3"])
def test_heatmap_rows_fire_in_forward_order_and_include_top_level_hooks(model_pair, name):
    from lens_det.parity import compare

    hf, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    report = compare(model, hf, tokens, mask, prefill=8)
    kinds, columns, grids = report.heatmap_data()
    fired = []  # hook kinds in the order their first hook fires in a forward pass

    def record(x, hook):
        if kind_of(hook.name) not in fired:
            fired.append(kind_of(hook.name))

    model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(lambda name: True, record)])
    fired.append("logits")
    assert kinds == fired
    top = ["embed.ln.hook_scale", "embed.ln.hook_normalized", "hook_embed"] if name == "tiny-bloom" else ["hook_embed"]
    assert kinds[:len(top)] == top and kinds[-3:] == ["ln_final.hook_scale", "ln_final.hook_normalized", "logits"]
    if name == "tiny-gemma3":
        order = ["attn.hook_q", "attn.q_norm.hook_normalized", "attn.hook_rot_q", "attn.hook_attn_scores",
                 "attn.hook_pattern", "attn.hook_z", "ln1_post.hook_normalized", "hook_attn_out", "hook_resid_mid",
                 "mlp.hook_pre", "ln2_post.hook_normalized", "hook_mlp_out", "hook_resid_post"]
        assert sorted(order, key=kinds.index) == order
    assert columns == ["embed", *map(str, range(model.cfg.n_layers)), "final"]
    for cached in (False, True):
        embed_row, logits_row = grids[cached][kinds.index("hook_embed")], grids[cached][kinds.index("logits")]
        assert embed_row[0] == 0.0 and embed_row[1:] == [None] * (len(columns) - 1)  # only in its own column
        assert logits_row[-1] == 0.0 and logits_row[:-1] == [None] * (len(columns) - 1)


def test_heatmap_keeps_exact_zeros_apart_from_tiny_diffs():
    """0 has its own colour, below the scale; a non-zero diff below the scale is clipped to its bottom, not 0."""
    import matplotlib.pyplot as plt

    from lens_det.parity.report import HookDiff, ParityReport

    rows = [HookDiff("cached:0", hook, layer, diff, diff, diff == 0, True) for hook, layer, diff in
            [("hook_embed", None, 0.0), ("blocks.0.hook_resid_pre", 0, 1e-12), ("logits", None, 0.5)]]
    report = ParityReport("t", Schedule(1, 0), 0.0, 1.0, rows)
    kinds, columns, grids = report.heatmap_data()
    assert kinds == ["hook_embed", "hook_resid_pre", "logits"] and columns == ["embed", "0", "final"]
    assert list(grids) == [True]  # no uncached rows: no empty "cache off" panel
    fig = report.plot(vmin=-8, vmax=1)
    assert len(fig.axes) == 2  # one panel and the colorbar
    image = fig.axes[0].images[0]
    values = image.get_array()
    assert values[0, 0] < -8 and values[1, 1] == -8 and values[2, 2] == math.log10(0.5)
    assert values.mask[0, 1] and values.mask[2, 0]  # not compared: blank
    cmap = image.get_cmap()
    assert cmap(image.norm(values[0, 0])) != cmap(image.norm(values[1, 1]))
    plt.close(fig)


def test_heatmap_marks_the_first_divergence(model_pair):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    hf, model = model_pair("tiny-bloom")
    tokens, mask = batch("left", model.cfg.d_vocab, length=12)
    with faults.alibi_row0_on_cached_steps():
        report = compare(model, hf, tokens, mask, prefill=6)
    kinds, _, _ = report.heatmap_data()
    fig = report.plot()
    off, on = fig.axes[:2]
    assert not [p for p in off.patches if isinstance(p, Rectangle)]  # the uncached half is clean
    (box,) = [p for p in on.patches if isinstance(p, Rectangle)]
    assert box.get_xy() == (1 - 0.5, kinds.index("attn.hook_attn_scores") - 0.5)  # column 1 = layer 0
    assert "step cached:1, layer 0, attn.hook_attn_scores" in fig._suptitle.get_text()
    assert off.get_title() == "cache off" and on.get_title() == "cache on"
    plt.close(fig)


def test_report_without_a_decode_step_says_so(model_pair):
    hf, model = model_pair("tiny-gemma")
    tokens, mask = batch("none", model.cfg.d_vocab, length=6)
    report = compare(model, hf, tokens, mask, prefill=6)
    assert report.schedule == Schedule(6, 0) and report.passed and report.decode_steps_compared == 0
    text = report.to_text()
    assert "no cached decode step" in text and "never read" in text
    assert compare(model, hf, tokens, mask, prefill=4).decode_steps_compared == 2
    assert "no cached decode step" not in compare(model, hf, tokens, mask, prefill=4).to_text()


def test_heatmap_title_names_the_schedule_and_the_input():
    import matplotlib.pyplot as plt

    from lens_det.parity.report import HookDiff, ParityReport

    rows = [HookDiff(step, "hook_embed", None, 0.0, 0.0, True, True) for step in ("uncached", "cached:0", "cached:1")]
    prompt = "The quick brown fox jumps over the lazy dog, " * 4
    report = ParityReport("t", Schedule(5, 1), 0.0, 0.0, rows, inputs=f"prompt {prompt!r}")
    fig = report.plot()
    title = fig._suptitle.get_text()
    assert "schedule 5+1x1" in title and "prompt 'The quick brown fox" in title
    assert max(map(len, title.splitlines())) <= 100  # the prompt is cut, the title stays as wide as the figure
    assert fig.axes[1].get_title() == "cache on"
    plt.close(fig)
    prefill_only = ParityReport("t", Schedule(5, 0), 0.0, 0.0, rows[:2])
    fig = prefill_only.plot()
    assert "schedule 5+0x1" in fig._suptitle.get_text()
    assert fig.axes[1].get_title() == "cache on: prefill only, never read"
    plt.close(fig)


@pytest.mark.parametrize("hook", ["blocks.0.attn.v_norm.hook_normalized", "blocks.0.attn.v_norm.hook_scale",
                                  "blocks.0.hook_q_input", "blocks.0.hook_k_input", "blocks.0.hook_v_input",
                                  "blocks.0.hook_attn_in", "blocks.0.attn.hook_v"])
def test_a_failing_per_head_hook_names_its_head(hook):
    """[batch, pos, head, ...] hooks: the first failing position and the head there (hook_v: the existing case)."""
    from lens_det.parity.report import diff_hook

    ref = torch.zeros(2, 4, 3, 5)
    ours = ref.clone()
    ours[1, 2, 1, 0] = 1.0  # position 2, head 1
    ours[0, 3, 0, 0] = 1.0  # later position: not the first
    row = diff_hook("cached:1", hook, ours, ref, 0.0, 0.0, offset=7)
    assert (row.passed, row.position, row.head) == (False, 7 + 2, 1)


def test_a_v_norm_divergence_is_reported_with_its_head(model_pair):
    """An edit of one head of Gemma 4's v_norm output: the report's first divergence names that hook and head."""
    hf, model = model_pair("tiny-gemma4")
    tokens, mask = batch("none", model.cfg.d_vocab, length=8)
    point = model.blocks[1].attn.v_norm.hook_normalized

    def shift_head_1(x, hook):
        x = x.clone()
        x[:, 3:, 1] += 1.0  # positions 3.. of kv head 1
        return x

    point.add_hook(shift_head_1, is_permanent=True)
    try:
        report = compare(model, hf, tokens, mask, prefill=4)
    finally:
        point.remove_hooks(including_permanent=True)
    first = report.first_divergence
    assert (first.step, first.hook, first.position, first.head) == \
        ("uncached", "blocks.1.attn.v_norm.hook_normalized", 3, 1)
    assert "position 3, head 1" in report.to_text()
