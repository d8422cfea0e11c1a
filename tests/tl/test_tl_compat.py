"""TransformerLens compatibility: run_with_cache / run_with_hooks / hooks(), ActivationCache helpers
(accumulated_resid, decompose_resid, stack_head_results, logit lens) and transformer_lens.patching run unchanged
on lens_det models, checked against exact invariants (float32 throughout).

Tolerances: "exact" means torch.equal. Where TL sums pieces in a different order than the forward (heads summed
one by one vs one matmul over all heads; cached-scale LN), we allow 1e-5 of the reference's max magnitude (a few
hundred fp32 ulps); a layout or missing-term bug is O(1) off.
"""

import pytest
import torch
import transformer_lens.patching as tl_patching
from transformer_lens import ActivationCache

from tests.helpers import ALL, batch

CONFIGS = ["tiny-bloom", "tiny-gemma2"]
# decompose_resid sums to resid_post only when each block adds attn_out / mlp_out to its input; tiny-bloom-resid
# (apply_residual_connection_post_layernorm) adds them to the norm output instead, so it is checked to NOT sum.
# tiny-gemma4(-ple, -moe) multiply the residual stream by a per-block layer_scalar, so decompose_resid refuses.
ADDITIVE = [n for n in ALL if n not in ("tiny-bloom-resid", "tiny-gemma4", "tiny-gemma4-ple", "tiny-gemma4-moe",
                                        "tiny-gemma3n")]
# Gemma 3n's residual is AltUp's streams (what it refuses: tests/parity/test_gemma3n.py)
ONE_STREAM = [n for n in ALL if n != "tiny-gemma3n"]
REL = 1e-5


def close(a, b, rel=REL):
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= rel * scale, f"max err {err} > {rel} * {scale}"


def tl_model(model_pair, name):
    return model_pair(name)[1]


def final_logits(model, normalized):
    """ln_final output -> logits the way TL users do it: @ W_U (no b_U), then Gemma 2/3's final soft-cap."""
    return model.unembed.final_cap(normalized @ model.W_U)


def no_hooks_left(model):
    return all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("name", ALL)
def test_run_with_cache_is_an_activation_cache(model_pair, name):
    model = tl_model(model_pair, name)
    tokens, _ = batch("none", model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    assert isinstance(cache, ActivationCache) and cache.model is model
    assert torch.equal(logits, model(tokens))
    results = set(model.disabled_hook_points())  # hook_result, hook_mlp_in: off by default
    assert set(cache.keys()) == set(model.hook_dict) - results
    L = model.cfg.n_layers
    # TL's short keys resolve to lens_det hook names; the residual stream chains block to block.
    assert torch.equal(cache["resid_pre", 0], cache["hook_embed"])
    for i in range(1, L):
        assert torch.equal(cache["resid_pre", i], cache[f"blocks.{i - 1}.hook_resid_post"])
    assert torch.equal(cache["z", L - 1, "attn"], cache[f"blocks.{L - 1}.attn.hook_z"])
    assert torch.equal(cache["resid_post", -1], cache[f"blocks.{L - 1}.hook_resid_post"])
    assert torch.equal(final_logits(model, cache["ln_final.hook_normalized"]), logits)
    _, one = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert not one.has_batch_dim
    if model.cfg.n_experts:  # each expert's GEMM has as many rows as it got from the batch: bits depend on it (as HF)
        torch.testing.assert_close(one["resid_post", 1], cache["resid_post", 1][0], rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(one["resid_post", 1], cache["resid_post", 1][0])


@pytest.mark.parametrize("name", ONE_STREAM)
def test_accumulated_resid_and_logit_lens(model_pair, name):
    model = tl_model(model_pair, name)
    L = model.cfg.n_layers
    tokens, _ = batch("none", model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    acc, labels = cache.accumulated_resid(layer=None, return_labels=True)
    assert labels == [f"{i}_pre" for i in range(L)] + ["final_post"]
    assert torch.equal(acc, torch.stack([cache["resid_pre", i] for i in range(L)] + [cache["resid_post", L - 1]]))
    mid = cache.accumulated_resid(layer=1, incl_mid=True, mlp_input=True)
    assert torch.equal(mid, torch.stack([cache["resid_pre", 0], cache["resid_mid", 0], cache["resid_pre", 1],
                                         cache["resid_mid", 1]]))
    # Logit lens: apply_ln=True runs model.ln_final on every entry; the last one is exactly the model's
    # ln_final output, so @ W_U (+ final soft-cap for Gemma 2/3) reproduces the logits bit for bit.
    lens = cache.accumulated_resid(apply_ln=True)
    assert torch.equal(lens[-1], cache["ln_final.hook_normalized"])
    assert torch.equal(final_logits(model, lens[-1]), logits)
    for i in range(L):
        assert torch.equal(lens[i], model.ln_final(cache["resid_pre", i]))
    # Intermediate layers are a different (and not degenerate) prediction.
    assert not torch.allclose(final_logits(model, lens[L // 2]), logits, atol=1e-2)


@pytest.mark.parametrize("name", ADDITIVE)
def test_decompose_resid_sums_to_resid(model_pair, name):
    model = tl_model(model_pair, name)
    L = model.cfg.n_layers
    tokens, _ = batch("none", model.cfg.d_vocab)
    _, cache = model.run_with_cache(tokens)
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed"] + [f"{i}_{k}_out" for i in range(L) for k in ("attn", "mlp")]
    assert torch.equal(parts[0], cache["hook_embed"]) and torch.equal(parts[-1], cache["mlp_out", L - 1])
    close(parts.sum(0), cache["resid_post", L - 1])
    for layer in range(L):  # decomposition of each block's input, and of its MLP input
        close(cache.decompose_resid(layer=layer).sum(0), cache["resid_pre", layer])
        close(cache.decompose_resid(layer=layer, mlp_input=True).sum(0), cache["resid_mid", layer])
    # apply_ln=True divides each part by the cached ln_final scale (centering first for LayerNorm): the parts
    # then sum to the normalised stream, which times ln_final's gain (+ bias) is ln_final's output.
    normed = cache.decompose_resid(apply_ln=True).sum(0)
    ln = model.ln_final
    out = normed * ln.w + ln.b if model.cfg.normalization_type == "LN" else normed * (1 + ln.w)
    close(out, cache["ln_final.hook_normalized"])


def test_decompose_resid_does_not_sum_with_post_layernorm_residual(model_pair):
    model = tl_model(model_pair, "tiny-bloom-resid")
    tokens, _ = batch("none", model.cfg.d_vocab)
    _, cache = model.run_with_cache(tokens)
    resid = cache["resid_post", -1]
    assert (cache.decompose_resid().sum(0) - resid).abs().max() > 0.1 * resid.abs().max()


@pytest.mark.parametrize("name", CONFIGS + ["tiny-gemma3"])
def test_stack_head_results(model_pair, name):
    model = tl_model(model_pair, name)
    c = model.cfg
    tokens, _ = batch("none", c.d_vocab)
    logits_plain, plain = model.run_with_cache(tokens)
    model.set_use_attn_result(True)
    try:
        logits, cache = model.run_with_cache(tokens)
    finally:
        model.set_use_attn_result(False)
    assert torch.equal(logits, logits_plain)  # hook_result is read-only: enabling it changes nothing
    heads, labels = cache.stack_head_results(layer=-1, return_labels=True)
    assert heads.shape == (c.n_layers * c.n_heads, *tokens.shape, c.d_model)
    assert labels == [f"L{l}H{h}" for l in range(c.n_layers) for h in range(c.n_heads)]
    for l in range(c.n_layers):
        block = model.blocks[l]
        result = cache[f"blocks.{l}.attn.hook_result"]
        assert torch.equal(heads[l * c.n_heads:(l + 1) * c.n_heads], result.movedim(2, 0))
        # Head h's contribution is z_h @ W_O[h] with TL's W_O layout [n_heads, d_head, d_model].
        close(result, torch.einsum("bphd,hdm->bphm", cache["z", l, "attn"], block.attn.W_O))
        attn = result.sum(2) + block.attn.b_O  # the attention module's output
        # Bloom adds it to the residual as hook_attn_out; Gemma 2/3 pass it through ln1_post first.
        close(block.ln1_post(attn), cache["attn_out", l])
    # Without hook_result, TL recomputes the heads from hook_z and blocks[l].attn.W_O: same stack.
    close(plain.stack_head_results(), heads)
    rest = cache.stack_head_results(incl_remainder=True)
    assert torch.equal(rest[:-1], heads)
    close(rest.sum(0), cache["resid_post", -1])


@pytest.mark.parametrize("name", CONFIGS)
def test_run_with_hooks_and_hooks_context(model_pair, name):
    model = tl_model(model_pair, name)
    tokens, _ = batch("none", model.cfg.d_vocab)
    clean = model(tokens)

    def zero(x, hook):
        return torch.zeros_like(x)

    ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", zero)])
    assert no_hooks_left(model) and torch.equal(model(tokens), clean)
    assert (ablated - clean).abs().max() > 1e-3
    # Same ablation done by hand: resid_mid := resid_pre (x + 0 == x exactly), so the logits are identical.
    pre = {}
    manual = model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.0.hook_resid_pre", lambda x, hook: pre.setdefault("x", x.clone())),
        ("blocks.0.hook_resid_mid", lambda x, hook: pre["x"]),
    ])
    assert torch.equal(manual, ablated)

    # hooks() context: same result, caching composes with it, and everything is removed on exit.
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", zero)]):
        assert torch.equal(model(tokens), ablated)
        logits, cache = model.run_with_cache(tokens)
        assert not no_hooks_left(model)  # the ablation hook stays for the rest of the context
    assert torch.equal(logits, ablated) and torch.equal(cache["attn_out", 0], torch.zeros_like(cache["attn_out", 0]))
    assert torch.equal(cache["resid_mid", 0], cache["resid_pre", 0])
    assert no_hooks_left(model) and torch.equal(model(tokens), clean)

    # Name filters fire once per matching hook point; an exception inside the context still removes hooks.
    seen = []
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_resid_pre"),
                                             lambda x, hook: seen.append(hook.name))])
    assert seen == [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: (_ for _ in ()).throw(RuntimeError("boom")))]):
            model(tokens)
    assert no_hooks_left(model) and torch.equal(model(tokens), clean)


def patch_setup(model, length=5, p0=2):
    """Clean and corrupted batches differing only at position p0, and a scalar metric on the last position."""
    clean, _ = batch("none", model.cfg.d_vocab, batch_size=2, length=length)
    corrupted = clean.clone()
    corrupted[:, p0] = (corrupted[:, p0] + 7) % model.cfg.d_vocab
    return clean, corrupted, (lambda logits: logits[:, -1, 5].mean())


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_patching_resid_pre_and_heads(model_pair, name):
    model = tl_model(model_pair, name)
    c, p0 = model.cfg, 2
    clean, corrupted, metric = patch_setup(model, p0=p0)
    clean_logits, clean_cache = model.run_with_cache(clean)
    m_clean, m_corr = metric(clean_logits), metric(model(corrupted))
    assert (m_clean - m_corr).abs() > 1e-3

    resid = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert resid.shape == (c.n_layers, clean.shape[1])
    # Before p0 clean == corrupted activations (causal), so the patch is a no-op: corrupted metric, exactly.
    assert (resid[:, :p0] == m_corr).all()
    # Layer 0 = the embeddings: patching p0 makes the whole input clean; later positions are no-ops.
    assert resid[0, p0] == m_clean and (resid[0, p0 + 1:] == m_corr).all()

    z = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)
    assert z.shape == (c.n_layers, clean.shape[1], c.n_heads)
    assert (z[:, :p0] == m_corr).all() and (z[:, p0:] != m_corr).any()
    v = tl_patching.get_act_patch_attn_head_v_all_pos(model, corrupted, clean_cache, metric)
    assert v.shape == (c.n_layers, c.n_key_value_heads)  # GQA: TL sweeps kv heads for k / v
    assert (v != m_corr).any()


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_patching_mlp_out_matches_manual(model_pair, name):
    model = tl_model(model_pair, name)
    L, p0 = model.cfg.n_layers, 2
    clean, corrupted, metric = patch_setup(model, p0=p0)
    _, clean_cache = model.run_with_cache(clean)
    _, corr_cache = model.run_with_cache(corrupted)
    out = tl_patching.get_act_patch_mlp_out(model, corrupted, clean_cache, metric, baseline=True)
    assert out.values.shape == (L, clean.shape[1]) and out.baseline == metric(model(corrupted))
    # Last layer, last position: resid_post = corrupted resid_mid + clean mlp_out there, then ln_final/unembed.
    x = corr_cache["resid_post", L - 1].clone()
    x[:, -1] = corr_cache["resid_mid", L - 1][:, -1] + clean_cache["mlp_out", L - 1][:, -1]
    expected = metric(model.unembed(model.ln_final(x)))
    assert torch.equal(out.values[L - 1, -1], expected.detach())
    assert torch.equal(out.values[:, :p0], out.baseline.expand(L, p0))


def test_loaded_model_is_eval(model_pair):
    """Loaded models are in eval mode, so TL's patching runs without model.eval()."""
    import lens_det
    from lens_det.parity.models import random_hf_model

    model = lens_det.from_hf_model(random_hf_model("tiny-bloom"))
    assert not model.training
    clean, corrupted, metric = patch_setup(model)
    _, cache = model.run_with_cache(clean)
    result = tl_patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    assert result.shape == (model.cfg.n_layers, clean.shape[1])


# --- TransformerLens idioms that used to give silently different results ---

@pytest.mark.parametrize("name", ALL)
def test_pos_slice_slices_every_hook_on_its_position_axis(model_pair, name):
    """run_with_cache(pos_slice=...) equals the full cache sliced on each hook's position axis (TL keeps the
    axis for an int); hook_rot_q/k and the q/k norms used to be sliced on their head axis."""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab, length=7)  # 7 positions: no other axis has that size
    _, full = model.run_with_cache(tokens, attention_mask=mask)
    for pos_slice, index in ((1, [1]), (-1, [6]), ((2, 5), slice(2, 5))):
        _, cache = model.run_with_cache(tokens, attention_mask=mask, pos_slice=pos_slice)
        assert set(cache.keys()) == set(full.keys())
        for hook in full.keys():
            whole = full[hook]
            # patterns / scores are [batch, head, pos, key_pos]; AltUp's stream stacks [stream, batch, pos, d_model]
            stacks = ("hook_streams", "hook_streams_pre", "hook_streams_post", "hook_predictions", "hook_corrected")
            dim = 2 if hook.endswith(("hook_pattern", "hook_attn_scores", *stacks)) else 1
            assert whole.shape[dim] == 7, hook
            expected = whole[(slice(None),) * dim + (index,)]
            assert torch.equal(cache[hook], expected), (hook, pos_slice)


def test_hooks_on_a_disabled_hook_point_raise_and_filters_skip_it(model_pair):
    _, model = model_pair("tiny-gemma2")
    tokens, _ = batch("none", model.cfg.d_vocab)
    name = "blocks.0.attn.hook_result"
    with pytest.raises(ValueError, match="set_use_attn_result\\(True\\)"):
        model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: x)])
    with pytest.raises(ValueError, match="never run"):
        model.add_hook(name, lambda x, hook: x)
    seen = []
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hook: seen.append(hook.name))])
    assert name not in seen and len(seen) == len(model.hook_dict) - len(model.disabled_hook_points())
    model.set_use_attn_result(True)
    try:
        fired = []
        model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: fired.append(x.shape))])
        assert fired == [(3, 16, model.cfg.n_heads, model.cfg.d_model)]
    finally:
        model.set_use_attn_result(False)


def test_patch_hook_refuses_a_clean_tensor_of_another_hook(model_pair):
    """README used to write a layer-3 hook_pattern slice into layer-0 hook_v without a word."""
    from lens_det.patching import patch_hook

    _, model = model_pair("tiny-gemma2")
    tokens, _ = batch("none", model.cfg.d_vocab)
    _, clean = model.run_with_cache(tokens)
    wrong = patch_hook(model, clean["blocks.3.attn.hook_pattern"], position=7)
    with pytest.raises(ValueError, match="does not fit blocks.0.attn.hook_v"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_v", wrong)])
    named = patch_hook(model, clean["blocks.3.attn.hook_v"], position=7, hook_name="blocks.3.attn.hook_v")
    with pytest.raises(ValueError, match="attach it to blocks.3.attn.hook_v"):  # same shape, another layer
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_v", named)])
    right = model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.attn.hook_v", named)])
    assert torch.equal(right, model(tokens))  # clean == running activation: the patch changes nothing


@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_direct_logit_attribution_sums_to_the_logit_difference(model_pair, name, dtype):
    """TL's DLA idiom: logit_attrs over decompose_resid sums to the pre-soft-cap logit difference (minus the
    final LayerNorm bias term for Bloom, which TL's fold_ln moves into b_U). It used to sum to 2.07 for a true
    0.39 (Gemma 2) and flip sign on Bloom. Tolerance: float32 rounding of ~10 summed parts, 1e-4 relative."""
    _, model = model_pair(name, dtype)
    tokens, _ = batch("none", model.cfg.d_vocab)
    logits, cache = model.run_with_cache(tokens)
    correct, wrong = tokens[:, 3], tokens[:, 5]  # one pair per row
    parts = cache.decompose_resid(layer=-1, pos_slice=-1)
    attrs = cache.logit_attrs(parts, tokens=correct, incorrect_tokens=wrong, pos_slice=-1)
    assert attrs.shape == (1 + 2 * model.cfg.n_layers, tokens.shape[0])
    pre_cap = cache["ln_final.hook_normalized"][:, -1].float() @ model.W_U.float()  # logits before the soft-cap
    rows = torch.arange(tokens.shape[0])
    diff = pre_cap[rows, correct] - pre_cap[rows, wrong]
    bias = model.final_norm_bias_logits()
    expected = diff - (bias[correct] - bias[wrong])
    torch.testing.assert_close(attrs.sum(0), expected, rtol=1e-4, atol=1e-4 * diff.abs().max().item())
    if not model.cfg.final_softcap:  # the model's own logits are the pre-cap ones
        torch.testing.assert_close(logits[rows, -1, correct] - logits[rows, -1, wrong], diff, rtol=1e-5, atol=1e-5)
    # Over heads (the remainder holds embeddings, MLPs and biases): the same total.
    heads = cache.stack_head_results(layer=-1, pos_slice=-1, incl_remainder=True)
    head_attrs = cache.logit_attrs(heads, tokens=correct, incorrect_tokens=wrong, pos_slice=-1)
    torch.testing.assert_close(head_attrs.sum(0), expected, rtol=1e-4, atol=1e-4 * diff.abs().max().item())


@pytest.mark.parametrize("name", ONE_STREAM)
def test_stop_and_start_at_layer_are_bit_exact_pieces_of_the_forward(model_pair, name):
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    kw = dict(attention_mask=mask, position_ids="mask")
    logits, cache = model.run_with_cache(tokens, **kw)
    # per-layer embeddings (tiny-gemma4-ple) are made from the token ids, which start_at_layer then needs
    ids = dict(input_ids=tokens) if model.cfg.d_per_layer_input else {}
    for k in (1, model.cfg.n_layers - 1, -1):
        layer = k % model.cfg.n_layers
        resid = model(tokens, stop_at_layer=k, **kw)
        assert torch.equal(resid, cache[f"blocks.{layer}.hook_resid_pre"])
        if any((j := model.cfg.layer_kv_source(i)) is not None and j < layer for i in range(layer, model.cfg.n_layers)):
            with pytest.raises(ValueError, match="KV sharing"):  # a skipped layer's keys/values are needed
                model(resid, start_at_layer=k, **kw, **ids)
            continue
        assert torch.equal(model(resid, start_at_layer=k, **kw, **ids), logits)
        if ids:
            with pytest.raises(ValueError, match="input_ids"):
                model(resid, start_at_layer=k, **kw)
    embedded, same_tokens, shortformer, same_mask = model.input_to_embed(tokens, attention_mask=mask)  # TL 2.x
    assert torch.equal(embedded, cache["hook_embed"]) and same_tokens is tokens and shortformer is None
    assert same_mask is mask and torch.equal(model(embedded, start_at_layer=0, **kw, **ids), logits)
    _, partial = model.run_with_cache(tokens, stop_at_layer=1, **kw)  # harvesting stops at layer 1
    assert ({k for k in partial.keys() if k.startswith("blocks.")}
            == {k for k in cache.keys() if k.startswith("blocks.0.")})
    with pytest.raises(ValueError, match="freeze"):
        model(tokens, stop_at_layer=1, kv_cache=model.new_cache(), **kw)
    with pytest.raises(ValueError, match="must be an int in"):
        model(tokens, stop_at_layer=model.cfg.n_layers + 1)


def test_string_inputs_and_tokenizer_helpers(model_pair):
    import lens_det

    model = lens_det.from_config("tiny-gemma2")
    texts = ["Hi", "Hello there"]
    tokens, mask = model.to_tokens(texts)
    by_ids = model(tokens, attention_mask=mask, position_ids="mask")
    assert torch.equal(model(texts), by_ids)  # strings: left-padded with their mask and mask positions
    assert torch.equal(model.run_with_cache(texts)[0], by_ids)
    greedy = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[])
    assert model.generate(texts, max_new_tokens=4, stop_at_eos=False, return_type="str") == \
        model.to_string(greedy.tokens, skip_special_tokens=True)
    assert torch.equal(model.generate(texts, max_new_tokens=4, stop_at_eos=False, return_type="tokens"),
                       greedy.tokens)
    assert isinstance(model.generate("Hi", max_new_tokens=2, return_type="input"), str)
    assert model.to_str_tokens("Hi!") == ["<bos>", "H", "i", "!"]
    assert model.get_token_position("i", "Hi!i") == 2 and model.get_token_position("i", "Hi!i", mode="last") == 4
    per_token = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    assert per_token.shape == (2, tokens.shape[1] - 1)
    keep = (mask[:, 1:] * mask[:, :-1]).float()
    torch.testing.assert_close(per_token.sum() / keep.sum(), model(tokens, attention_mask=mask, return_type="loss"))


def test_to_tokens_tl_idiom_fails_with_what_to_write():
    import lens_det

    model = lens_det.from_config("tiny-gemma2")
    tokens = model.to_tokens("Hello")  # TransformerLens: a tensor; here (tokens, mask), and it says so
    with pytest.raises(AttributeError, match="tokens, mask = model.to_tokens"):
        tokens.shape
    with pytest.raises(TypeError, match="tokens, mask = model.to_tokens"):
        tokens[:, 1:]
    ids, mask = tokens  # the lens_det idiom still unpacks
    assert ids.shape == mask.shape
    # and the pair runs with its mask (tests/api/test_padded_inputs.py)
    assert torch.equal(model(tokens), model("Hello"))


def test_decompose_resid_refuses_a_scaled_residual_stream(model_pair):
    """Gemma 4: resid_post = layer_scalar * (resid_mid + mlp_out), so attn_out / mlp_out do not sum to it."""
    model = tl_model(model_pair, "tiny-gemma4")
    tokens, _ = batch("none", model.cfg.d_vocab)
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(ValueError, match="layer_scalar"):
        cache.decompose_resid()
    s = model.blocks[0].layer_scalar
    assert torch.equal(cache["resid_post", 0], (cache["resid_mid", 0] + cache["mlp_out", 0]) * s)


# tiny-gemma4(-ple, -moe)'s full layers have their own d_head / kv heads (and -ple's KV-sharing layers no K/V weights)
UNIFORM = [n for n in ALL if n not in ("tiny-gemma4", "tiny-gemma4-ple", "tiny-gemma4-moe", "tiny-gemma3n")]


def test_weight_stacks_refuse_mixed_geometry_and_blocks_keep_tl_meaning(model_pair):
    """Gemma 4: model.W_Q etc. cannot stack layers of different d_head and refuse, naming blocks[i].attn.W_Q; each
    block's views reproduce its hooks (K = V layers: W_V is W_K)."""
    _, model = model_pair("tiny-gemma4")
    tokens, _ = batch("none", model.cfg.d_vocab)
    _, cache = model.run_with_cache(tokens)
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "_W_K", "OV", "QK"):
        with pytest.raises(ValueError, match=r"blocks\[i\]\.attn\."):
            getattr(model, name)
    assert model.b_O.shape == (model.cfg.n_layers, model.cfg.d_model) and model.W_in.shape[0] == model.cfg.n_layers
    for l, block in enumerate(model.blocks):
        attn, x = block.attn, cache[f"blocks.{l}.ln1.hook_normalized"]
        for hook, W, b in (("q", attn.W_Q, attn.b_Q), ("k", attn.W_K, attn.b_K), ("v", attn.W_V, attn.b_V)):
            got = cache[f"blocks.{l}.attn.hook_{hook}"]
            if hook != "q":
                got = got.repeat_interleave(model.cfg.layer_n_rep(l), dim=2)
            close(got, torch.einsum("bpm,hmd->bphd", x, W) + b)
        z = cache[f"blocks.{l}.attn.hook_z"]
        close(torch.einsum("bphd,hdm->bpm", z, attn.W_O), z.flatten(2) @ attn.w_o.T)


@pytest.mark.parametrize("name", UNIFORM)
def test_weight_stacks_have_transformer_lens_meaning(model_pair, name):
    """Each stacked weight reproduces the hook it feeds (float32 rounding of a matmul: 1e-5): q/k/v from
    ln1's output with W_Q/W_K/W_V (+ b), the MLP's pre-activation with W_gate or W_in (+ b_in), and
    OV/QK are the factored products of the same weights."""
    _, model = model_pair(name)
    tokens, _ = batch("none", model.cfg.d_vocab)
    _, cache = model.run_with_cache(tokens)
    L = model.cfg.n_layers
    for l in range(L):
        x = cache[f"blocks.{l}.ln1.hook_normalized"]
        for hook, W, b in (("q", model.W_Q, model.b_Q), ("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V)):
            expected = torch.einsum("bpm,hmd->bphd", x, W[l]) + b[l]
            got = cache[f"blocks.{l}.attn.hook_{hook}"]
            if hook != "q":  # hooks hold the kv heads; the TL stacks repeat them to n_heads
                got = got.repeat_interleave(model.cfg.n_rep, dim=2)
            close(got, expected)
        m = cache[f"blocks.{l}.ln2.hook_normalized"]
        W_pre = model.W_gate if model.cfg.gated_mlp else model.W_in
        close(cache[f"blocks.{l}.mlp.hook_pre"], m @ W_pre[l] + model.b_in[l] * (not model.cfg.gated_mlp))
    assert torch.equal(model._W_K.repeat_interleave(model.cfg.n_rep, dim=1), model.W_K)
    close(model.OV.AB, model.W_V @ model.W_O)
    close(model.QK.AB, model.W_Q @ model.W_K.transpose(-2, -1))
    assert torch.equal(model.b_U, torch.zeros(model.cfg.d_vocab))


@pytest.mark.parametrize("name", ALL)
def test_cfg_has_transformer_lens_fields_with_their_meaning(name):
    import lens_det

    model = lens_det.from_config(name)
    cfg, arch = model.cfg, model.config
    rope = arch.positional == "rope"
    assert cfg.positional_embedding_type == ("rotary" if rope else "alibi")
    assert cfg.d_vocab_out == arch.d_vocab and cfg.eps == arch.norm_eps and cfg.window_size == arch.sliding_window
    assert cfg.attn_types == ["local" if t == "sliding_attention" else "global" for t in arch.layer_types]
    assert cfg.output_logits_soft_cap == (arch.final_softcap or -1.0)  # TL's -1.0: no cap
    assert cfg.attn_scores_soft_cap == (arch.attn_softcap or -1.0)
    assert cfg.act_fn == {"bloom": "gelu_fast"}.get(arch.architecture, "gelu_pytorch_tanh")
    assert cfg.model_name == name and cfg.original_architecture.endswith("ForCausalLM")
    assert cfg.n_ctx == (2048 if not rope else model.config.n_ctx) and cfg.n_ctx > 0
    assert cfg.rotary_base == (max(arch.rope_theta) if rope and "full_attention" in arch.layer_types
                               else (arch.rope_theta[0] if rope else None))
    assert cfg.default_prepend_bos is True and cfg.tokenizer_prepends_bos is True
    assert cfg.use_attn_result is False
    model.set_use_attn_result(True)
    assert cfg.use_attn_result is True


# --- issue 19: TransformerLens spellings (past_kv_cache=, prepend_bos= / padding_side=, W_gate) ---

def test_past_kv_cache_is_tl_spelling_of_kv_cache():
    """A lens_det KVCache under TL's name runs the same code as kv_cache= (bit-identical logits and cache: 0.0); a
    TransformerLens cache object, or both names, is refused with what to pass."""
    import lens_det
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = lens_det.from_config("tiny-gemma2", seed=0)
    tokens, _ = batch("none", model.cfg.d_vocab, batch_size=2, length=8)
    ours, theirs = model.new_cache(), model.new_cache()
    with torch.no_grad():
        for a, b in ((0, 5), (5, 6), (6, 8)):
            assert torch.equal(model(tokens[:, a:b], past_kv_cache=theirs), model(tokens[:, a:b], kv_cache=ours))
    assert torch.equal(ours.mask, theirs.mask)
    assert all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
               for x, y in zip(ours.layers, theirs.layers))
    with torch.no_grad():
        logits, _ = model.run_with_cache(tokens, past_kv_cache=model.new_cache())
        assert torch.equal(logits, model(tokens, kv_cache=model.new_cache()))
    tl_cache = object.__new__(TransformerLensKeyValueCache)
    with pytest.raises(TypeError, match=r"TransformerLensKeyValueCache.*kv_cache=model\.new_cache\(\)"):
        model(tokens, past_kv_cache=tl_cache)
    with pytest.raises(ValueError, match="pass kv_cache or past_kv_cache"):
        model(tokens, kv_cache=model.new_cache(), past_kv_cache=model.new_cache())


@pytest.mark.parametrize("call", ["forward", "run_with_cache"])
def test_prepend_bos_and_padding_side_tokenize_text_as_tl(call):
    """With text, prepend_bos= and padding_side= are to_tokens' (TL's meaning): the result is bit-identical (0.0) to
    running to_tokens' output with its mask and mask positions. With token ids they would do nothing, so they raise
    with what to pass instead."""
    import lens_det

    model = lens_det.from_config("tiny-gemma2", seed=0)
    run = (lambda *a, **k: model(*a, **k)) if call == "forward" else (lambda *a, **k: model.run_with_cache(*a, **k)[0])
    texts = ["Hi", "Hello there"]
    for kw in ({"prepend_bos": False}, {"padding_side": "right"}, {"prepend_bos": False, "padding_side": "left"}):
        tokens, mask = model.to_tokens(texts, **kw)
        with torch.no_grad():
            assert torch.equal(run(texts, **kw), model(tokens, attention_mask=mask, position_ids="mask")), kw
    no_bos, _ = model.to_tokens("Hi", prepend_bos=False)
    assert no_bos[0, 0] != model.tokenizer.bos_token_id  # prepend_bos=False did reach the tokenizer
    tokens, mask = model.to_tokens(texts)
    for kw in ({"prepend_bos": False}, {"padding_side": "left"}):
        with pytest.raises(ValueError, match=r"apply to text input.*attention_mask"):
            run(tokens, attention_mask=mask, **kw)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        run(texts, padding_side="middle")


def test_w_gate_is_none_without_a_gated_mlp_as_tl():
    import lens_det

    bloom, gemma = lens_det.from_config("tiny-bloom"), lens_det.from_config("tiny-gemma2")
    assert not bloom.cfg.gated_mlp and bloom.W_gate is None  # TL's HookedTransformer.W_gate
    assert torch.equal(gemma.W_gate, torch.stack([b.mlp.W_gate for b in gemma.blocks]))
