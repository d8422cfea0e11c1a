"""TransformerLens weight processing (fold_ln, center_writing_weights, center_unembed, fold_value_biases,
refactor_factored_attn_matrices): each step keeps the function (logits, or log-probs after center_unembed) and has
TL's meaning (what it makes zero, identity or folded); a step that would change the function is refused before any
weight moves.

Tolerance for "same function": 1e-5 of the reference logits' max magnitude (before the final soft-cap, where there is
one: the cap compresses the values, not the rounding of its input). The processed weights are the old ones
multiplied or summed in float64 and rounded once to float32, so the forward rounds differently: measured up to
3.6e-6 relative on these configs (weights N(0, 0.3), logits up to ~8). A wrong fold (a missing gain, bias or
centring) is O(1) off. Postconditions that are exact by construction (zeroed biases, identity norms) use 0.0; means
that should vanish are float64 means rounded to float32: |mean| <= 1e-6.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lens_det
from lens_det.parity import compare
from lens_det.config import LensConfig
from lens_det.weight_processing import STEPS, why_not
from tests.helpers import ALL, BLOOM, batch
from tests.strategies import build_hf, config_kwargs

REL = 1e-5


def valid_steps(config):
    return [s for s in STEPS if why_not(config, s) is None]


# Random configs (the hypothesis tests) draw d_model down to 2 with a norm right after the attention / MLP output
# (Gemma 2/3's post-norms): dividing by the RMS of a 2-4 element vector that happens to be small magnifies the one
# rounding of a fold (measured 3.3e-5 on gemma2 with d_model 4: fold_value_biases before ln1_post). A wrong fold is
# still O(1) off.
REL_RANDOM = 1e-4


def assert_same_function(processed, reference, tokens, mask, steps, rel: float = REL):
    pre_cap = {}  # the reference's logits before the final soft-cap (the identity without one)
    handle = reference.unembed.final_cap.register_forward_hook(lambda m, args, out: pre_cap.__setitem__("x", args[0]))
    try:
        ref = reference(tokens, attention_mask=mask).float()
    finally:
        handle.remove()
    out = processed(tokens, attention_mask=mask).float()
    if "center_unembed" in steps:
        out, ref = out.log_softmax(-1), ref.log_softmax(-1)
    real = mask.bool()
    # the scale is the logits' magnitude before the soft-cap: processing perturbs the pre-cap logits by rounding
    # relative to their size, and tanh (slope <= 1) passes at most that on, whatever it compresses the values to
    scale = max(ref[real].abs().max().item(), pre_cap["x"].float()[real].abs().max().item())
    err = (out - ref)[real].abs().max().item()
    assert err <= rel * scale, f"{steps}: max |diff| {err:.3g} > {rel} * {scale:.3g}"


def case_ids():
    # (name, steps): every valid step alone, and all valid steps together (TL's process_weights_ with the refactor)
    cases = []
    for name in ALL:
        steps = valid_steps(LensConfig.from_name(name))
        cases += [(name, (s,)) for s in steps] + [(name, tuple(steps))]
    return cases


CASES = case_ids()


@pytest.mark.parametrize("name, steps", CASES, ids=[f"{n}-{'+'.join(s)}" for n, s in CASES])
def test_processed_model_computes_the_same_function(model_pair, name, steps):
    hf, model = model_pair(name)
    processed = lens_det.from_hf_model(hf, **{s: True for s in steps})
    assert processed.processing == steps
    tokens, mask = batch("left", model.cfg.d_vocab)
    assert_same_function(processed, model, tokens, mask, steps)
    # a KV cache on a processed model still equals its own uncached run (lens_det's cache contract)
    from lens_det.parity import self_parity

    assert self_parity(processed, tokens, mask, prefill=6, chunk=3).passed


def test_valid_steps_per_family_are_what_the_math_allows(model_pair):
    """Which steps each family gets: LayerNorm models are centred, RMSNorm ones are not; the final soft-cap forbids
    centring W_U; RoPE (and q/k norms, GQA) forbid the QK refactor; Bloom's post-LN residual forbids fold_ln."""
    got = {name: valid_steps(model_pair(name)[1].config) for name in ALL}
    assert got["tiny-bloom"] == list(STEPS)
    assert got["tiny-bloom-resid"] == [s for s in STEPS if s != "fold_ln"]
    assert got["tiny-gemma"] == ["fold_ln", "center_unembed", "fold_value_biases"]
    assert got["tiny-gemma2"] == got["tiny-gemma3"] == ["fold_ln", "fold_value_biases"]


@pytest.mark.parametrize("name, step, reason", [
    ("tiny-gemma2", "center_writing_weights", "RMSNorm does not subtract the mean"),
    ("tiny-gemma2", "center_unembed", "soft-cap"),
    ("tiny-gemma3", "refactor_factored_attn_matrices", "RoPE"),
    ("tiny-bloom-resid", "fold_ln", "residual_from_norm"),
])
def test_invalid_steps_are_refused_before_any_weight_moves(model_pair, name, step, reason):
    hf, _ = model_pair(name)
    model = lens_det.from_hf_model(hf)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"(?s){reason}.*Pass {step}=False"):
        model.process_weights_(**{s: s in (step, "fold_value_biases") for s in STEPS})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.processing == ()
    with pytest.raises(TypeError, match="weight-processing options are fold_ln"):
        lens_det.from_hf_model(hf, fold_layernorm=True)


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma3"])
def test_fold_ln_has_transformer_lens_meaning(model_pair, name):
    """Norms only normalise (identity gain, zero bias); W_Q, W_in and W_U carry the gains (centred over d_model for
    LayerNorm, TL's center_weights), b_U carries the final LayerNorm bias; DLA over decompose_resid then sums to
    the logit difference minus b_U's, TransformerLens's identity."""
    hf, model = model_pair(name)
    folded = lens_det.from_hf_model(hf, fold_ln=True)
    layer_norm = model.cfg.norm == "layernorm"
    assert folded.cfg.normalization_type == ("LNPre" if layer_norm else "RMSPre")
    for norm in [folded.ln_final, *(b.ln1 for b in folded.blocks), *(b.ln2 for b in folded.blocks)]:
        assert torch.equal(folded_gain(norm), torch.ones_like(norm.w))
        assert not hasattr(norm, "b") or not norm.b.any()

    def expected(weight, gain):  # TL: W * gain over d_model, then centred over d_model for LayerNorm
        w = weight.double() * gain.double().view(-1, *[1] * (weight.ndim - 1))
        return (w - w.mean(0, keepdim=True) if layer_norm else w).float()

    ln1_gain = folded_gain(model.blocks[1].ln1)
    torch.testing.assert_close(folded.blocks[1].attn.W_Q, expected(model.blocks[1].attn.W_Q.transpose(0, 1), ln1_gain)
                               .transpose(0, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(folded.W_in[0], expected(model.W_in[0], folded_gain(model.blocks[0].ln2)),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(folded.W_U, expected(model.W_U, model.final_norm_gain()), rtol=0, atol=1e-6)
    torch.testing.assert_close(folded.b_U, model.final_norm_bias_logits(), rtol=0, atol=1e-5)
    assert not folded.final_norm_bias_logits().any()
    assert torch.equal(model.W_E, folded.W_E) and folded.unembed.weight is not None  # untied: W_E left alone

    tokens, _ = batch("none", model.cfg.d_vocab)
    logits, cache = folded.run_with_cache(tokens)
    correct, wrong, rows = tokens[:, 3], tokens[:, 5], torch.arange(tokens.shape[0])
    attrs = cache.logit_attrs(cache.decompose_resid(layer=-1, pos_slice=-1), tokens=correct, incorrect_tokens=wrong,
                              pos_slice=-1)
    pre_cap = cache["ln_final.hook_normalized"][:, -1] @ folded.W_U + folded.b_U
    diff = pre_cap[rows, correct] - pre_cap[rows, wrong]
    expected_sum = diff - (folded.b_U[correct] - folded.b_U[wrong])
    torch.testing.assert_close(attrs.sum(0), expected_sum, rtol=1e-4, atol=1e-4 * diff.abs().max().item())
    if not model.cfg.final_softcap:
        torch.testing.assert_close(logits[rows, -1, correct] - logits[rows, -1, wrong], diff, rtol=1e-5, atol=1e-5)


def folded_gain(norm):  # the elementwise gain a norm applies: w, or 1 + w for Gemma's RMSNorm
    return norm.w + 1 if getattr(norm, "unit_offset", False) else norm.w


def test_centring_steps_have_transformer_lens_meaning(model_pair):
    """center_writing_weights: W_E, W_O, b_O, W_out, b_out have zero mean over d_model, so every attention / MLP
    output has mean zero; center_unembed: W_U and b_U have zero mean over the vocabulary."""
    hf, model = model_pair("tiny-bloom")
    centred = lens_det.from_hf_model(hf, fold_ln=True, center_writing_weights=True, center_unembed=True)
    means = {"W_E": centred.W_E.mean(-1), "W_O": centred.W_O.mean(-1), "b_O": centred.b_O.mean(-1),
             "W_out": centred.W_out.mean(-1), "b_out": centred.b_out.mean(-1), "W_U": centred.W_U.mean(-1),
             "b_U": centred.b_U.mean(-1)}
    for what, mean in means.items():
        assert mean.abs().max() <= 1e-6, what
    _, cache = centred.run_with_cache(batch("none", model.cfg.d_vocab)[0])
    for i in range(model.cfg.n_layers):
        for hook in ("hook_attn_out", "hook_mlp_out"):
            assert cache[f"blocks.{i}.{hook}"].mean(-1).abs().max() <= 1e-5, hook


def test_value_bias_fold_and_refactor_have_transformer_lens_meaning(model_pair):
    """fold_value_biases: b_V = 0 exactly, b_O absorbs sum_h b_V[h] W_O[h], attention outputs unchanged.
    refactor: W_QK (with the biases as an extra input row) and W_OV unchanged; W_O's rows orthonormal; the
    patterns unchanged."""
    hf, model = model_pair("tiny-bloom")
    folded = lens_det.from_hf_model(hf, fold_value_biases=True)
    assert not folded.b_V.any()
    torch.testing.assert_close(folded.b_O, model.b_O + torch.einsum("lhd,lhdm->lm", model.b_V, model.W_O),
                               rtol=0, atol=1e-6)
    refactored = lens_det.from_hf_model(hf, refactor_factored_attn_matrices=True)

    def qk(m):  # [layer, head, d_model + 1, d_model + 1]
        q = torch.cat([m.W_Q, m.b_Q[:, :, None]], 2)
        k = torch.cat([m.W_K, m.b_K[:, :, None]], 2)
        return q.double() @ k.double().transpose(-1, -2)

    torch.testing.assert_close(qk(refactored), qk(model), rtol=0, atol=1e-5 * qk(model).abs().max().item())
    torch.testing.assert_close(refactored.OV.AB, model.OV.AB, rtol=0, atol=1e-5 * model.OV.AB.abs().max().item())
    eye = torch.eye(model.cfg.d_head).expand_as(refactored.W_O @ refactored.W_O.transpose(-1, -2))
    torch.testing.assert_close(refactored.W_O @ refactored.W_O.transpose(-1, -2), eye, rtol=0, atol=1e-5)
    tokens, _ = batch("none", model.cfg.d_vocab)
    _, ref = model.run_with_cache(tokens)
    for m in (folded, refactored):
        _, cache = m.run_with_cache(tokens)
        for i in range(model.cfg.n_layers):
            for hook in ("attn.hook_pattern", "hook_attn_out"):
                name = f"blocks.{i}.{hook}"
                torch.testing.assert_close(cache[name], ref[name], rtol=0, atol=REL * ref[name].abs().max().item())


def test_load_time_options_equal_the_method_and_leave_the_hf_model_alone(model_pair, tmp_path):
    hf, _ = model_pair("tiny-bloom")
    hf_before = {k: v.clone() for k, v in hf.state_dict().items()}
    steps = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True,
                 refactor_factored_attn_matrices=False)
    at_load = lens_det.from_hf_model(hf, share_weights=True, **steps)
    by_method = lens_det.from_hf_model(hf).process_weights_()  # TL's defaults: the same four steps
    assert by_method.processing == at_load.processing == tuple(s for s in STEPS if steps[s])
    assert all(torch.equal(hf_before[k], v) for k, v in hf.state_dict().items())  # shared storage not written
    hf.save_pretrained(tmp_path)
    loaded = lens_det.from_pretrained(tmp_path, tokenizer=False, **steps)
    for m in (by_method, loaded):
        a, b = at_load.state_dict(), m.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parity_report_of_a_processed_model(model_pair):
    """The report says the model is processed, skips the hooks whose meaning changed (naming the step), compares
    the rest (and log-probs instead of logits) at a stated tolerance, and refuses tolerance 0."""
    hf, _ = model_pair("tiny-bloom")
    processed = lens_det.from_hf_model(hf).process_weights_()
    tokens, mask = batch("left", processed.cfg.d_vocab)
    with pytest.raises(ValueError, match="pass a tolerance"):
        compare(processed, hf, tokens, mask)
    report = compare(processed, hf, tokens, mask, rtol=REL)
    assert report.passed and report.coverage == 1.0, report.to_text()
    assert report.not_compared["blocks.0.ln1.hook_normalized"] == "changed by fold_ln"
    assert report.not_compared["blocks.1.hook_resid_post"] == "changed by center_writing_weights"
    assert "log_probs" in {r.hook for r in report.rows} and "logits" in report.not_compared
    compared = {r.hook for r in report.rows}
    assert {"blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post", "blocks.1.ln2.hook_scale"} <= compared
    assert "processed weights (fold_ln, center_writing_weights, center_unembed, fold_value_biases)" in report.to_text()
    wrong = lens_det.from_hf_model(hf).process_weights_()
    with torch.no_grad():
        wrong.blocks[1].mlp.w_in[0, 0] += 0.5  # an edit the processing does not explain
    assert not compare(wrong, hf, tokens, mask, rtol=REL).passed


COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_random_config(data, config, seed):
    family, kwargs = config
    hf = build_hf(family, kwargs, torch.float32, seed, 0.3)
    model = lens_det.from_hf_model(hf)
    steps = [s for s in valid_steps(model.config) if data.draw(st.booleans(), label=s)]
    processed = lens_det.from_hf_model(hf, **{s: True for s in steps})
    n = data.draw(st.integers(1, 8), label="length")
    tokens = torch.tensor(data.draw(st.lists(st.integers(0, model.cfg.d_vocab - 1), min_size=n, max_size=n)))[None]
    assert_same_function(processed, model, tokens, torch.ones_like(tokens), steps, rel=REL_RANDOM)


@settings(max_examples=40, derandomize=True, **COMMON)
@given(data=st.data(), config=config_kwargs(), seed=st.integers(0, 2**16))
def test_processing_keeps_the_function_on_random_configs(data, config, seed):
    """Random valid configs of every family (biases, GQA, soft-caps, tied or not) and a random subset of the steps
    valid for it: same logits (log-probs with center_unembed) at REL_RANDOM."""
    check_random_config(data, config, seed)


@pytest.mark.slow
@settings(max_examples=500, **COMMON)
@given(data=st.data(), config=config_kwargs(), seed=st.integers(0, 2**16))
def test_processing_keeps_the_function_long_run(data, config, seed):
    check_random_config(data, config, seed)


@pytest.mark.parametrize("name", BLOOM)
def test_processed_model_deterministic_mode_still_invariant(model_pair, name):
    """Processing changes weights, not the forward: the deterministic mode's batch invariance holds."""
    hf, _ = model_pair(name)
    model = lens_det.from_hf_model(hf).process_weights_(fold_ln=name == "tiny-bloom")
    from lens_det.determinism import batch_invariance

    prompt = batch("none", model.cfg.d_vocab)[0][0, :6]
    with lens_det.deterministic():
        report = batch_invariance(model, prompt, batch_sizes=(2, 5))
    assert report.passed and report.max_abs() == 0.0, report.to_text()
