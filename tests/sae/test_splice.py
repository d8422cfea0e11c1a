"""Spliced SAEs and transcoders against HF and against their stated invariants.

- Against HF (tolerance 0.0): the model with an SAE spliced in (no error term) equals the HF model with the same
  reconstruction put in place of the HF module's tensor by a plain torch hook, computed in the test with F.linear
  (the op lens_det's SAE runs), in fp32 and bf16 (the SAE in fp32: cast in, cast back). Hand-picked cases and a
  hypothesis property over families, layers, sites, architectures and dtypes.
- The error term: with use_error_term=True the logits and every model hook are bit-identical to the model without
  the SAE (0.0), hooked or not; editing hook_sae_error (returned or in place) makes the output recon + edited error.
- Through the cache and generation (deterministic mode, where cache on = off is bit-exact): feature activations of
  the cached steps equal the uncached ones, and steering gives the same tokens with the cache on and off.
- Gradients to features: equal to HF's (0.0) and to central finite differences (stated tolerance).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lens_det
from lens_det.sae import SAE, SAEConfig, hook_width
from lens_det.sae import features

SANDWICH = ["tiny-gemma2", "tiny-gemma3"]  # Gemma 2/3: post-norms, so hook_mlp_out is post_feedforward_layernorm's
GEN = torch.Generator().manual_seed(0)


def random_sae(model, hook, architecture="jumprelu", d_sae=40, hook_out=None, skip=False, seed=0,
               dtype=torch.float32):
    cfg = model.config
    d_in = hook_width(cfg, hook)
    d_out = hook_width(cfg, hook_out) if hook_out else None
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook, architecture=architecture, hook_name_out=hook_out,
                        d_out=d_out, k=7 if architecture == "topk" else None, skip=skip, model_name=model.name),
              dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[0] ** 0.5)
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=gen) * 0.3)
    return sae


def reference_recon(sae, x):
    """The SAE's reconstruction written out (F.linear, lens_det.ops.linear's op outside deterministic mode)."""
    x = x.to(sae.dtype)
    pre = F.linear(x, sae.W_enc.T, sae.b_enc)
    arch = sae.cfg.architecture
    if arch == "relu":
        acts = torch.relu(pre)
    elif arch == "jumprelu":
        acts = torch.relu(pre) * (pre > sae.threshold)
    else:
        idx = torch.sort(pre, dim=-1, descending=True, stable=True).indices[..., : sae.cfg.k]
        acts = torch.zeros_like(pre).scatter(-1, idx, torch.relu(pre.gather(-1, idx)))
    recon = F.linear(acts, sae.W_dec.T, sae.b_dec)
    if sae.cfg.skip:
        recon = recon + F.linear(x, sae.W_skip.T)
    return recon


def _out(out):
    return out[0] if isinstance(out, tuple) else out


def hf_with_sae(hf, sae, site, layer, tokens, mask):
    """HF logits with the SAE's reconstruction in place of the HF tensor of `site` at `layer`."""
    inner = hf.model if hasattr(hf, "model") else hf.transformer
    dec = (inner.layers if hasattr(inner, "layers") else inner.h)[layer]
    handles, held = [], {}

    def replace_out(mod, args, out):
        t = _out(out)
        x = held.pop("x", t)
        new = reference_recon(sae, x).to(t.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    if site == "resid":
        handles.append(dec.register_forward_hook(replace_out))
    elif site == "mlp":
        handles.append(dec.post_feedforward_layernorm.register_forward_hook(replace_out))
    elif site == "attn_z":
        def pre(mod, args):
            z = args[0]
            return (reference_recon(sae, z).to(z.dtype),)
        handles.append(dec.self_attn.o_proj.register_forward_pre_hook(pre))
    elif site == "transcoder":
        handles.append(dec.pre_feedforward_layernorm.register_forward_hook(
            lambda mod, args, out: held.__setitem__("x", _out(out))))
        handles.append(dec.post_feedforward_layernorm.register_forward_hook(replace_out))
    try:
        with torch.no_grad():
            return hf(tokens, attention_mask=mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


SITES = {"resid": ("blocks.{}.hook_resid_post", None), "mlp": ("blocks.{}.hook_mlp_out", None),
         "attn_z": ("blocks.{}.attn.hook_z", None),
         "transcoder": ("blocks.{}.ln2.hook_normalized", "blocks.{}.hook_mlp_out")}


def _tokens(model, b=2, t=9):
    tokens = torch.randint(0, model.cfg.d_vocab, (b, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding
    return tokens, mask


def check_against_hf(model_pair, name, dtype, site, layer, architecture, skip=False):
    hf, model = model_pair(name, dtype)
    hook, out = (s and s.format(layer) for s in SITES[site])
    sae = random_sae(model, hook, architecture, hook_out=out, skip=skip)
    tokens, mask = _tokens(model)
    with model.saes([sae], use_error_term=False):
        ours = model(tokens, attention_mask=mask)
    theirs = hf_with_sae(hf, sae, site, layer, tokens, mask)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    plain = model(tokens, attention_mask=mask)
    assert not torch.equal(plain, ours)  # the splice did something


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", SANDWICH)
@pytest.mark.parametrize("site,architecture,skip", [("resid", "jumprelu", False), ("mlp", "relu", False),
                                                    ("attn_z", "topk", False), ("transcoder", "jumprelu", True),
                                                    ("transcoder", "relu", False)])
def test_spliced_model_equals_hf_with_the_same_reconstruction(model_pair, name, dtype, site, architecture, skip):
    check_against_hf(model_pair, name, dtype, site, 1, architecture, skip)


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma"])
def test_residual_sae_on_bloom_and_gemma1(model_pair, name):
    check_against_hf(model_pair, name, torch.float32, "resid", 1, "jumprelu")


SPLICE_DRAWS = dict(name=st.sampled_from(SANDWICH), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
                    site=st.sampled_from(list(SITES)), layer=st.integers(0, 1),
                    architecture=st.sampled_from(["relu", "jumprelu", "topk"]), skip=st.booleans())


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**SPLICE_DRAWS)
def test_property_spliced_equals_hf(model_pair, name, dtype, site, layer, architecture, skip):
    check_against_hf(model_pair, name, dtype, site, layer, architecture, skip and site == "transcoder")


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**SPLICE_DRAWS)
def test_property_spliced_equals_hf_long(model_pair, name, dtype, site, layer, architecture, skip):
    check_against_hf(model_pair, name, dtype, site, layer, architecture, skip and site == "transcoder")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("site", list(SITES))
def test_error_term_leaves_every_hook_and_the_logits_bit_identical(model_pair, dtype, site):
    _, model = model_pair("tiny-gemma3", dtype)
    hook, out = (s and s.format(1) for s in SITES[site])
    sae = random_sae(model, hook, "jumprelu", hook_out=out)
    tokens, mask = _tokens(model)
    ref_logits, ref = model.run_with_cache(tokens, attention_mask=mask)
    with model.saes([sae], use_error_term=True):
        plain = model(tokens, attention_mask=mask)  # unhooked: the clean reconstruction is the reconstruction
        logits, cache = model.run_with_cache(tokens, attention_mask=mask)  # hooked: recomputed apart
    assert torch.equal(plain, ref_logits) and torch.equal(logits, ref_logits)
    for key in ref.keys():
        assert torch.equal(cache[key], ref[key]), key
    recon = cache[f"{hook}.hook_sae_recons"]
    assert recon.dtype == torch.float32  # the SAE's own dtype; error and output in the model's
    target = ref[out or hook].flatten(-2) if site == "attn_z" else ref[out or hook]
    assert cache[f"{hook}.hook_sae_error"].dtype == dtype
    assert torch.equal(cache[f"{hook}.hook_sae_error"], target - recon.to(dtype))


@pytest.mark.parametrize("in_place", [False, True])
def test_editing_the_error_makes_the_output_recon_plus_error(model_pair, in_place):
    _, model = model_pair("tiny-gemma2")
    hook = "blocks.1.hook_resid_post"
    sae = random_sae(model, hook)
    tokens, mask = _tokens(model)
    with model.saes([sae], use_error_term=False):
        without = model(tokens, attention_mask=mask)

    def zero(err, hook):
        if in_place:
            err.zero_()
            return None
        return torch.zeros_like(err)

    with model.saes([sae], use_error_term=True):
        zeroed = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(f"{hook}.hook_sae_error", zero)])
    assert torch.equal(zeroed, without)  # recon + 0 is the reconstruction alone


def test_steering_with_the_error_term_moves_the_activation_by_the_decoded_change(model_pair):
    _, model = model_pair("tiny-gemma2")
    hook = "blocks.1.hook_resid_post"
    sae = random_sae(model, hook)
    tokens, mask = _tokens(model)
    _, ref = model.run_with_cache(tokens, attention_mask=mask, names_filter=hook)
    name, steer = features.steer(sae, 5, 3.0, "add")
    with model.saes([sae], use_error_term=True), model.hooks(fwd_hooks=[(name, steer)]):
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.startswith(hook))
    moved = cache[f"{hook}.hook_sae_output"] - ref[hook]
    # (recon(acts + 3 e_5) - recon(acts)) is 3 * W_dec[5] up to fp32 rounding of two sums of ~40 terms
    torch.testing.assert_close(moved, (3.0 * sae.W_dec[5]).expand_as(moved), atol=2e-5, rtol=0)


def _steps_sae(model):
    return random_sae(model, "blocks.1.hook_resid_post", "jumprelu", seed=3)


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3", "tiny-bloom"])
def test_generated_feature_activations_cache_on_equal_off(model_pair, name):
    """The activations the cached steps computed (return_activations='steps') equal the uncached steps' at 0.0 in
    deterministic mode, position for position, and equal a one-pass forward up to rounding."""
    _, model = model_pair(name)
    sae = _steps_sae(model)
    tokens, mask = _tokens(model)
    acts = f"{sae.cfg.hook_name}.hook_sae_acts_post"
    with lens_det.deterministic(), model.saes([sae], use_error_term=True):
        on = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[], return_activations="steps",
                            names_filter=acts)
        off = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[], use_kv_cache=False,
                             return_activations="steps", names_filter=acts)
        again = model(on.tokens[:, :-1], attention_mask=on.attention_mask[:, :-1], position_ids="mask")
    assert torch.equal(on.tokens, off.tokens)
    assert on.activations[acts].shape == (2, tokens.shape[1] + 3, sae.cfg.d_sae)
    assert torch.equal(on.activations[acts], off.activations[acts])
    assert list(on.activations.keys()) == [acts]
    del again


@pytest.mark.parametrize("mode,value", [("clamp", 8.0), ("add", 6.0), ("ablate", 0.0)])
def test_steering_gives_the_same_tokens_with_the_cache_on_and_off(model_pair, mode, value):
    _, model = model_pair("tiny-gemma2")
    sae = _steps_sae(model)
    tokens, mask = _tokens(model)
    with lens_det.deterministic(), model.saes([sae], use_error_term=True):
        plain = model.generate(tokens, mask, max_new_tokens=6, stop_tokens=[])
        # steer the first feature that is active somewhere (ablate needs one), at the prompt's last position and
        # every generated one
        active = int(features.feature_acts(model, sae, tokens, mask, position_ids="mask")[1].amax(0).argmax())
        hook = features.steer(sae, active, value, mode, positions=range(tokens.shape[1] - 1, 40), model=model)
        on = model.generate(tokens, mask, max_new_tokens=6, stop_tokens=[], fwd_hooks=[hook])
        off = model.generate(tokens, mask, max_new_tokens=6, stop_tokens=[], fwd_hooks=[hook], use_kv_cache=False)
    assert torch.equal(on.tokens, off.tokens)
    assert torch.equal(torch.stack(on.logits), torch.stack(off.logits))
    assert not torch.equal(torch.stack(on.logits), torch.stack(plain.logits))  # the steering took effect


def test_feature_gradients_equal_hf_and_finite_differences(model_pair):
    hf, model = model_pair("tiny-gemma2")
    hook = "blocks.1.hook_resid_post"
    sae = random_sae(model, hook, "relu")
    tokens, mask = _tokens(model)

    def metric(logits):
        return logits[:, -1].logsumexp(-1).sum()

    acts, grad = features.feature_attribution(model, sae, tokens, metric, attention_mask=mask)
    # HF: the same reconstruction from leaf feature activations in place of the layer's output, error term added
    inner = hf.model.layers[1]
    leaf = {}

    def replace(mod, args, out):
        t = _out(out)
        x = t.to(sae.dtype)
        a = torch.relu(F.linear(x, sae.W_enc.T, sae.b_enc)).detach().requires_grad_(True)
        leaf["a"] = a
        recon = F.linear(a, sae.W_dec.T, sae.b_dec).to(t.dtype)
        new = t + (recon - recon.detach())
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = inner.register_forward_hook(replace)
    try:
        value = metric(hf(tokens, attention_mask=mask, use_cache=False).logits)
    finally:
        handle.remove()
    (hf_grad,) = torch.autograd.grad(value, leaf["a"])
    assert torch.equal(grad, hf_grad)
    assert torch.equal(acts, leaf["a"].detach())
    # central differences on three (row, pos, feature) entries: truncation O(eps^2) ~ 1e-6 and fp32 rounding of the
    # metric (~1e-6 * |metric| / eps ~ 1e-4 here), so 2e-3 absolute
    eps = 1e-2
    for row, pos, feat in [(0, 8, 3), (1, 4, 11), (1, 8, int(grad[1, 8].abs().argmax()))]:
        def shifted(delta):
            def hook(a, hook):
                a = a.clone()
                a[row, pos, feat] += delta
                return a
            with model.saes([sae], use_error_term=True), torch.no_grad():
                return metric(model.run_with_hooks(tokens, attention_mask=mask,
                                                   fwd_hooks=[(f"{hook_name}.hook_sae_acts_post", hook)]))
        hook_name = hook
        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert abs(float(fd) - float(grad[row, pos, feat])) < 2e-3, (row, pos, feat, float(fd))


def test_attribution_patching_is_acts_difference_times_gradient(model_pair):
    _, model = model_pair("tiny-gemma2")
    sae = random_sae(model, "blocks.1.hook_resid_post")
    clean, mask = _tokens(model)
    corrupt = clean.clone()
    corrupt[:, 5] = (corrupt[:, 5] + 1) % model.cfg.d_vocab

    def metric(logits):
        return logits[:, -1, 7].sum()

    attr = features.attribution_patching(model, sae, clean, corrupt, metric, attention_mask=mask)
    acts_clean = features.feature_acts(model, sae, clean, mask)
    acts_corrupt, grad = features.feature_attribution(model, sae, corrupt, metric, attention_mask=mask)
    assert torch.equal(attr, (acts_clean - acts_corrupt) * grad)
    assert attr[:, :5].abs().max() == 0  # positions before the change have the same activations


def test_top_activations_skip_pads_and_order_largest_first(model_pair):
    _, model = model_pair("tiny-gemma2")
    sae = random_sae(model, "blocks.1.hook_resid_post", "relu")
    tokens, mask = _tokens(model)
    acts = features.feature_acts(model, sae, tokens, mask)
    top = features.top_activations(model, sae, tokens, [0, 9], k=4, attention_mask=mask)
    for feat, rows in top.items():
        values = acts[..., feat].masked_fill(mask == 0, float("-inf")).flatten()
        want = torch.sort(values, descending=True, stable=True)
        assert [v for v, _, _ in rows] == want.values[:4].tolist()
        assert all(mask[r, p] == 1 for _, r, p in rows)


def test_transcoder_reads_the_norm_output_and_replaces_the_mlp_output(model_pair):
    _, model = model_pair("tiny-gemma3")
    sae = random_sae(model, "blocks.1.ln2.hook_normalized", hook_out="blocks.1.hook_mlp_out", skip=True)
    tokens, mask = _tokens(model)
    with model.saes([sae]):
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    x = cache["blocks.1.ln2.hook_normalized"]
    assert torch.equal(cache["blocks.1.ln2.hook_normalized.hook_sae_input"], x)
    # TL 2.x's hook_mlp_in is hook_resid_mid, the residual before the norm: not what a transcoder reads
    assert not torch.equal(x, cache["blocks.1.hook_resid_mid"])
    assert torch.equal(cache["blocks.1.ln2.hook_normalized.hook_sae_output"], reference_recon(sae, x))
    resid = cache["blocks.1.hook_resid_mid"] + cache["blocks.1.ln2.hook_normalized.hook_sae_output"]
    assert torch.equal(cache["blocks.1.hook_resid_post"], resid)


def test_attach_detach_and_the_context_restore_what_was_there(model_pair):
    _, model = model_pair("tiny-gemma2")
    a = random_sae(model, "blocks.1.hook_resid_post", seed=1)
    b = random_sae(model, "blocks.1.hook_resid_post", seed=2)
    hooks, keys = set(model.hook_dict), set(model.state_dict())
    model.add_sae(a)
    with model.saes([b]):  # replaces a at the same hook for the block
        assert model.acts_to_saes["blocks.1.hook_resid_post"] is b
    assert model.acts_to_saes["blocks.1.hook_resid_post"] is a
    assert set(model.state_dict()) == keys  # SAE weights are not the model's
    model.reset_saes()
    assert set(model.hook_dict) == hooks and model.acts_to_saes == {}
    with pytest.raises(ValueError, match="no SAE is attached"):
        model.remove_sae(a)


def test_sae_keeps_its_dtype_when_the_model_is_cast():
    model = lens_det.from_config("tiny-gemma2", seed=0)
    sae = random_sae(model, "blocks.1.hook_resid_post")
    model.add_sae(sae)
    model.to(torch.bfloat16)
    tokens, mask = _tokens(model)
    logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: "sae" in n)
    assert sae.dtype == torch.float32 and cache["blocks.1.hook_resid_post.hook_sae_acts_post"].dtype == torch.float32
    assert cache["blocks.1.hook_resid_post.hook_sae_output"].dtype == torch.bfloat16
    model.reset_saes()


def test_backward_hooks_on_sae_hooks_fire(model_pair):
    _, model = model_pair("tiny-gemma2")
    sae = random_sae(model, "blocks.1.hook_resid_post")
    tokens, mask = _tokens(model)
    grads = {}
    with model.saes([sae], use_error_term=True):
        model.add_hook("blocks.1.hook_resid_post.hook_sae_acts_post",
                       lambda g, hook: grads.__setitem__("acts", g[0] if isinstance(g, tuple) else g), dir="bwd")
        try:
            model(tokens, attention_mask=mask)[:, -1].sum().backward()
        finally:
            model.reset_hooks()
    model.zero_grad(set_to_none=True)
    assert grads["acts"].shape == (2, 9, sae.cfg.d_sae) and grads["acts"].abs().sum() > 0


def test_compare_refuses_a_model_with_saes(model_pair):
    hf, model = model_pair("tiny-gemma2")
    tokens, mask = _tokens(model)
    with model.saes([random_sae(model, "blocks.1.hook_resid_post")]):
        with pytest.raises(ValueError, match="SAEs are spliced in"):
            lens_det.parity.compare(model, hf, tokens, mask)


def test_step_hook_steering_gives_the_same_tokens_with_the_cache_on_and_off(model_pair):
    """A feature clamped from generation step 2 on (generate's step_hooks on an SAE hook point)."""
    _, model = model_pair("tiny-gemma3")
    sae = _steps_sae(model)
    tokens, mask = _tokens(model)
    hook = features.steer(sae, 4, 9.0, "clamp")
    with lens_det.deterministic(), model.saes([sae], use_error_term=True):
        plain = model.generate(tokens, mask, max_new_tokens=6, stop_tokens=[])
        on = model.generate(tokens, mask, max_new_tokens=6, stop_tokens=[], step_hooks={2: [hook]})
        off = model.generate(tokens, mask, max_new_tokens=6, stop_tokens=[], step_hooks={2: [hook]},
                             use_kv_cache=False)
    assert torch.equal(on.tokens, off.tokens)
    assert torch.equal(torch.stack(on.logits), torch.stack(off.logits))
    assert torch.equal(torch.stack(on.logits[:2]), torch.stack(plain.logits[:2]))  # steps before 2 untouched
    assert not torch.equal(torch.stack(on.logits[2:]), torch.stack(plain.logits[2:]))


def test_a_compiled_model_picks_up_an_sae_attached_after_compiling():
    """torch.compile (eager backend, op for op) guards on the hook point's splices: attaching and detaching after
    the first compiled call takes effect, bit for bit as uncompiled."""
    model = lens_det.from_config("tiny-gemma2", seed=0)
    reference = lens_det.from_config("tiny-gemma2", seed=0)
    sae = random_sae(model, "blocks.1.hook_resid_post", "relu")
    tokens, _ = _tokens(model)
    model.compile(backend="eager")
    with torch.no_grad():
        before = model(tokens)
        model.add_sae(sae)
        spliced = model(tokens)
        model.reset_saes()
        after = model(tokens)
        reference.add_sae(sae)
        expected = reference(tokens)
    assert torch.equal(spliced, expected) and torch.equal(before, after) and not torch.equal(before, spliced)
