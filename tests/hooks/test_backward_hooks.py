"""Backward hooks and gradients: hooks never change the forward or the gradients (float32 and bfloat16), hook_scale
is on the autograd graph as in TransformerLens, and lens_det's gradients equal HF's (float32).

The loss is sum(logits * R) for a fixed random R, the same for both models, so every logit seeds a gradient. HF's
gradient of a hook point's tensor is read with `retain_grad` on the HF module input or output that
`lens_det.parity.capture_reference` reads that hook point from (its "module" sources; derived values such as
hook_scale and values recorded inside HF's attention call have no HF tensor of their own).

Tolerances: 0.0 wherever lens_det runs HF's ops in the backward too, which includes every norm with or without
hooks on it. Where lens_det's forward is bit-identical to HF's but its backward differs, GRAD_TOL states the
measured bound and the cause, none of them in the norms; a hook-free lens_det backward gives the same bits there,
which the hooked one must equal at 0.0 (test_hooks_do_not_change_gradients).
"""

from __future__ import annotations

import pytest
import torch

from lens_det import ops
from lens_det.convert import family_for
from lens_det.parity import reference
from tests.helpers import ALL, DTYPES, batch

# name -> (parameter gradients, hook-point gradients): the bound on max |lens - HF| / max |HF| per tensor, the worst
# measured (left-padded and unpadded batches) x 4. The causes, all outside lens_det/components/norms.py
# (Bloom is exact since its GELU takes HF's own backward formula, ops._BloomGelu; it was 6.3e-7 / 7.6e-6):
#   Gemma 4 MoE: HF's router and pre_feedforward_layernorm_2 read one reshaped view of the residual stream, so their
#     gradients are summed together before the residual's other readers' are added; lens_det's read it directly: the
#     same terms grouped differently, from the last MoE block down (measured 5.8e-6 / 2.3e-6).
#   Gemma 4 (all three): QK_NORM_TOL below.
GRAD_TOL = {
    "tiny-bloom": (0.0, 0.0),
    "tiny-bloom-resid": (0.0, 0.0),
    "tiny-gemma": (0.0, 0.0),
    "tiny-gemma2": (0.0, 0.0),
    "tiny-vaultgemma": (0.0, 0.0),
    "tiny-gemma3": (0.0, 0.0),
    "tiny-gemma4": (0.0, 0.0),
    "tiny-gemma4-ple": (0.0, 0.0),
    "tiny-gemma4-moe": (2.5e-5, 1e-5),
    # Gemma 3n: exact once AltUp adds in place on its permuted matmul output as HF does (an out-of-place add gave
    # the matmul's backward another gradient layout: 6e-7); the q/k norm weights as Gemma 4 (QK_NORM_TOL)
    "tiny-gemma3n": (0.0, 0.0),
}
# Gemma 4's q_norm / k_norm weight gradients: HF rotates [batch, pos, head, d] before its transpose, lens_det after
# it ([batch, head, pos, d]), so the gradient reaching the norm has another memory layout and the weight gradient's
# sum over batch, pos and head adds in another order (measured 3.0e-7, MoE model 9.5e-7). Every other gradient of
# tiny-gemma4 and tiny-gemma4-ple is exact.
QK_NORM_TOL = 4e-6


def _seed(model, tokens):
    return torch.randn(*tokens.shape, model.cfg.d_vocab, generator=torch.Generator().manual_seed(0))


def _hf_module_taps(hf, cfg, tokens, mask):
    """{lens hook name: (HF module, "in" or "out", layout fn)} for the hook points read from an HF module's tensor."""
    taps = {}
    tap = reference._Recorder.tap

    def spy(self, module, name, where, fn=lambda t: t):
        taps[name] = (module, where, fn)
        return tap(self, module, name, where, fn)

    reference._Recorder.tap = spy
    try:
        reference.capture_reference(hf, cfg, tokens, mask)
    finally:
        reference._Recorder.tap = tap
    return {n: t for n, t in taps.items() if not n.endswith("hook_scale")}  # hook_scale is derived, not a tensor


def hf_gradients(hf, cfg, tokens, mask, seed):
    """(HF's parameter gradients under lens_det names, {lens hook name: HF's gradient of that hook's tensor})."""
    taps, held, handles = _hf_module_taps(hf, cfg, tokens, mask), {}, []

    def keeper(name):
        def keep(t):
            t.retain_grad()
            held[name] = t
        return keep

    for name, (module, where, _) in taps.items():
        keep = keeper(name)
        if where == "out":
            handles.append(module.register_forward_hook(
                lambda m, a, k, out, keep=keep: keep(out[0] if isinstance(out, tuple) else out), with_kwargs=True))
        else:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, keep=keep: keep(a[0] if a else k["hidden_states"]), with_kwargs=True))
    hf.zero_grad(set_to_none=True)
    try:
        (hf(tokens, attention_mask=mask, use_cache=False).logits * seed).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    params = dict(hf.named_parameters())
    grads = {k: params[k].grad if k in params else torch.zeros_like(v) for k, v in hf.state_dict().items()}
    hf.zero_grad(set_to_none=True)
    return family_for(hf.config).state_dict_from_hf(grads, cfg), {n: taps[n][2](t.grad) for n, t in held.items()}


def regrouping_backward_hooks(model) -> set[str]:
    """hook_k of K = V layers (Gemma 4): their key tensor is also the values, and in HF's graph (which lens_det's
    hook-free graph is) its gradient sums four terms (k_norm's and v_norm's two reads each) in one running sum. A
    backward hook on hook_k wraps the k_norm side in its own node, which sums those two first: the same terms,
    grouped differently, so the gradients below differ by rounding (test_hooks_do_not_change_gradients)."""
    return {f"blocks.{i}.attn.hook_k" for i in range(model.cfg.n_layers)
            if model.config.layer_k_eq_v(i) and f"blocks.{i}.attn.hook_k" in model.hook_dict}


def lens_gradients(model, tokens, mask, seed, every_hook: bool, regrouping: bool = False):
    """(parameter gradients, cache): with every_hook, TransformerLens's caching hooks on every hook point, forward and
    backward (what run_with_cache(incl_bwd=True) attaches), so the cache holds each activation and its *_grad; the
    backward hooks of regrouping_backward_hooks(model) only with `regrouping`."""
    cache, fwd, bwd = model.get_caching_hooks(incl_bwd=True) if every_hook else ({}, [], [])
    skip = set() if regrouping else regrouping_backward_hooks(model)
    model.zero_grad(set_to_none=True)
    with model.hooks(fwd_hooks=fwd, bwd_hooks=[(n, fn) for n, fn in bwd if n not in skip]):
        (model(tokens, attention_mask=mask) * seed).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, cache


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    return max(((x - b[k]).abs().max().item(), k) for k, x in a.items())


def relative_errors(ours: dict, hf: dict) -> dict[str, float]:
    return {k: ((x - hf[k]).abs().max() / hf[k].abs().max()).item() for k, x in ours.items()}


@pytest.mark.parametrize("name", ALL)
def test_gradients_with_every_hook_cached_match_hf(model_pair, name):
    """Parameter gradients, the embedding's (hook_embed_grad: what enters the residual stream) and every hook point's
    *_grad, under caching hooks on every hook point, against HF's gradients of the same tensors: within GRAD_TOL,
    and 0.0 for every family from the logits back to the last block's output (ln_final's backward included)."""
    hf, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    seed = _seed(model, tokens)
    hf_params, hf_acts = hf_gradients(hf, model.config, tokens, mask, seed)
    params, cache = lens_gradients(model, tokens, mask, seed, every_hook=True)
    cfg = model.config
    # HF tensors with two roles that lens_det hooks apart: HF's gradient sums both roles, each lens hook's has one.
    for i in range(cfg.n_layers):  # K = V: k_proj's output is the keys and the values
        if cfg.layer_k_eq_v(i):
            hf_acts.pop(f"blocks.{i}.attn.hook_k", None)
            hf_acts.pop(f"blocks.{i}.attn.hook_v", None)
    if cfg.d_per_layer_input:  # the embedding also feeds the per-layer inputs (hook_embed has both roles)
        hf_acts.pop("blocks.0.hook_resid_pre")
    off = model.disabled_hook_points()  # opt-in hooks (hook_mlp_in, hook_attn_in, ...), off by default
    acts = {n: cache[n + "_grad"] for n in hf_acts if n not in off and n in model.hook_dict}  # (not the taps' parts)
    hf_acts = {n: g for n, g in hf_acts.items() if n in acts}
    assert "hook_embed" in acts and len(acts) > 10 * cfg.n_layers
    param_tol, act_tol = GRAD_TOL[name]
    qk_tol = QK_NORM_TOL if cfg.v_norm else param_tol  # Gemma 4
    bad = {k: e for k, e in relative_errors(params, hf_params).items()
           if e > (qk_tol if k.endswith(("q_norm.w", "k_norm.w")) else param_tol)}
    assert not bad, bad
    bad = {k: e for k, e in relative_errors(acts, hf_acts).items() if e > act_tol}
    assert not bad, bad
    last = f"blocks.{cfg.n_layers - 1}."  # from the logits back to here every family runs HF's backward ops
    tail = {n: e for n, e in relative_errors(acts, hf_acts).items()
            if n in (last + "hook_resid_post", last + "hook_mlp_out", "ln_final.hook_normalized")}
    assert len(tail) == 3 and not any(tail.values()), tail


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hooks_do_not_change_gradients(model_pair, name, dtype):
    """Caching hooks on every hook point, forward and backward (but regrouping_backward_hooks), leave every
    parameter gradient as a hook-free backward computes it: 0.0 (the same ops, summed in the same order)."""
    _, model = model_pair(name, dtype)
    tokens, mask = batch("left", model.cfg.d_vocab)
    seed = _seed(model, tokens)
    free, _ = lens_gradients(model, tokens, mask, seed, every_hook=False)
    hooked, _ = lens_gradients(model, tokens, mask, seed, every_hook=True)
    assert max_diff(hooked, free)[0] == 0.0, max_diff(hooked, free)


@pytest.mark.parametrize("name", ["tiny-gemma4", "tiny-gemma4-moe"])
def test_a_backward_hook_on_hook_k_of_a_k_eq_v_layer_regroups_the_gradient_sum(model_pair, name):
    """regrouping_backward_hooks: with them too, the parameter gradients differ from the hook-free ones by rounding
    only, at most 1.2e-5 of each tensor's max (measured 1.6e-6 and 2.9e-6, x 4); the forward is unchanged."""
    _, model = model_pair(name)
    assert regrouping_backward_hooks(model)
    tokens, mask = batch("left", model.cfg.d_vocab)
    seed = _seed(model, tokens)
    free, _ = lens_gradients(model, tokens, mask, seed, every_hook=False)
    hooked, _ = lens_gradients(model, tokens, mask, seed, every_hook=True, regrouping=True)
    worst = max(relative_errors(hooked, free).values())
    assert worst <= 1.2e-5, worst


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_run_with_cache_incl_bwd_equals_the_hook_free_forward(model_pair, name, dtype):
    """run_with_cache(incl_bwd=True): the loss and every activation equal a forward without backward hooks (0.0),
    and every norm's hook_scale gets a gradient (it is on the autograd graph)."""
    _, model = model_pair(name, dtype)
    tokens, mask = batch("left", model.cfg.d_vocab)
    with torch.no_grad():
        loss = model(tokens, attention_mask=mask, return_type="loss")
        _, free = model.run_with_cache(tokens, attention_mask=mask)
    hooked_loss, cache = model.run_with_cache(tokens, attention_mask=mask, return_type="loss", incl_bwd=True)
    model.zero_grad(set_to_none=True)
    assert torch.equal(hooked_loss, loss)
    worst = max(((cache[k] - v).abs().max().item(), k) for k, v in free.items() if v.is_floating_point())
    assert worst[0] == 0.0, worst
    assert all(torch.equal(cache[k], v) for k, v in free.items())
    scales = [k for k in free.keys() if k.endswith("hook_scale")]
    missing = [k for k in scales if k + "_grad" not in cache]
    assert scales and not missing, missing


def _gain(norm_module) -> torch.Tensor:
    """The factor the norm multiplies by: w, or 1 + w (Gemma's unit offset)."""
    w = norm_module.w.detach().double()
    return 1.0 + w if getattr(norm_module, "unit_offset", False) else w


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("norm", ["ln_final", "blocks.0.ln1"])
def test_hook_scale_is_on_the_autograd_graph(model_pair, name, norm):
    """retain_grad() on the scale a forward hook sees (no backward hook), and a backward hook on hook_scale alone
    (no forward hook), both give dL/d scale in TransformerLens's meaning (the norm's output as x_c / scale * w + b,
    x_c fixed): -sum(g * x_c * w) / scale^2, g the gradient at hook_normalized. The two agree at 0.0 (the same
    graph); the formula, in float64 from the cached float32 tensors, to 1e-5 of sum(|g * x_c * w|) / scale^2 (its
    terms cancel, so a float32 sum over d_model is good to about d_model ulps of that, not of the result)."""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    seed = _seed(model, tokens)
    kept, from_bwd = {}, {}

    def keep(scale, hook):
        scale.retain_grad()
        kept["scale"] = scale

    for fwd, bwd in ([(norm + ".hook_scale", keep)], []), \
                    ([], [(norm + ".hook_scale", lambda grad, hook: from_bwd.__setitem__("grad", grad.clone()))]):
        cache, c_fwd, c_bwd = model.get_caching_hooks(names_filter=[_input_name(model, norm),
                                                                    norm + ".hook_normalized"], incl_bwd=True)
        with model.hooks(fwd_hooks=c_fwd + fwd, bwd_hooks=c_bwd + bwd):
            (model(tokens, attention_mask=mask) * seed).sum().backward()
        model.zero_grad(set_to_none=True)
    # `cache` is the second run's; both runs' forwards are the hook-free one (test_..._keeps_the_logits)
    assert kept["scale"].grad is not None, "retain_grad() on hook_scale gave no gradient: it is off the graph"
    assert "grad" in from_bwd, "a backward hook on hook_scale did not fire"
    assert torch.equal(kept["scale"].grad, from_bwd["grad"])
    x = _norm_input(model, cache, norm).double()
    if model.cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    scale = kept["scale"].detach().double()
    terms = cache[norm + ".hook_normalized_grad"].double() * x * _gain(model.get_submodule(norm))
    expected, magnitude = -terms.sum(-1, keepdim=True) / scale**2, terms.abs().sum(-1, keepdim=True) / scale**2
    err = (kept["scale"].grad.double() - expected).abs()
    assert (err <= 1e-5 * magnitude).all(), (err / magnitude).max()


def _input_name(model, norm: str) -> str:
    if model.config.n_streams > 1:  # AltUp: ln_final reads the streams' mean, ln1 the stream-0 prediction
        return "streams_out.hook_mean" if norm == "ln_final" else "blocks.0.altup.hook_predictions"
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" if norm == "ln_final" else "blocks.0.hook_resid_pre"


def _norm_input(model, cache, norm: str) -> torch.Tensor:
    x = cache[_input_name(model, norm)]
    return x[0] if _input_name(model, norm).endswith("hook_predictions") else x


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma2", "tiny-gemma4-ple"])
def test_a_backward_hook_alone_on_hook_scale_fires_and_changes_nothing(model_pair, name):
    """A backward hook with no forward hook on the same hook_scale fires once per call; the logits and the parameter
    gradients equal a hook-free run's (0.0)."""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    seed = _seed(model, tokens)
    free = model(tokens, attention_mask=mask)
    (free * seed).sum().backward()
    free_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fired = []
    with model.hooks(bwd_hooks=[("ln_final.hook_scale", lambda grad, hook: fired.append(grad.shape))]):
        logits = model(tokens, attention_mask=mask)
        (logits * seed).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert fired == [(*tokens.shape, 1)]
    assert torch.equal(logits, free)
    assert max_diff(grads, free_grads)[0] == 0.0, max_diff(grads, free_grads)


SCALE_HOOKS = {
    "clone": lambda scale, hook: scale.clone(),
    "detach": lambda scale, hook: scale.detach(),  # TransformerLens's "freeze the norm" idiom
    "read": lambda scale, hook: None,
}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("kind", sorted(SCALE_HOOKS))
def test_a_scale_hook_that_keeps_the_value_keeps_the_logits(model_pair, name, kind):
    """A forward hook on every hook_scale that returns the same values (a clone, a detached copy, or None) leaves
    the logits bit-identical (0.0), with and without grad mode (grad mode attaches the scale to the graph)."""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    with torch.no_grad():
        free = model(tokens, attention_mask=mask)
    hooks = [(n, SCALE_HOOKS[kind]) for n in model.hook_dict if n.endswith("hook_scale")]
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens, attention_mask=mask)
        with torch.no_grad():
            no_grad_logits = model(tokens, attention_mask=mask)
    assert (logits - free).abs().max().item() == 0.0
    assert (no_grad_logits - free).abs().max().item() == 0.0


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma", "tiny-gemma4"])
def test_an_edited_scale_is_applied_transformer_lens_style(model_pair, name):
    """An edit of hook_scale is applied as x_c / edited * w + b at the edited positions only: doubling the scale at
    position 7 halves (normalized - b) there, and every other position stays bit-identical (0.0). The halving holds
    to 4 fp32 ulps of |x_c w / 2s| + |b| (measured 1.6): x_c / 2s * w + b is computed with its own roundings, not
    HF's output halved."""
    _, model = model_pair(name)
    tokens, mask = batch("none", model.cfg.d_vocab)

    def double_at_7(scale, hook):
        scale = scale.clone()
        scale[:, 7] *= 2
        return scale

    with torch.no_grad():
        _, free = model.run_with_cache(tokens, attention_mask=mask, names_filter="ln_final.hook_normalized")
        with model.hooks(fwd_hooks=[("ln_final.hook_scale", double_at_7)]):
            _, edited = model.run_with_cache(tokens, attention_mask=mask, names_filter="ln_final.hook_normalized")
    before, after = free["ln_final.hook_normalized"], edited["ln_final.hook_normalized"]
    b = getattr(model.ln_final, "b", None)
    b = torch.zeros(()) if b is None else b.detach()
    others = torch.ones(tokens.shape[1], dtype=torch.bool)
    others[7] = False
    assert (after[:, others] - before[:, others]).abs().max().item() == 0.0
    halved = (before[:, 7] - b) / 2
    err = (after[:, 7] - b - halved).abs()
    assert (err <= 4 * torch.finfo(torch.float32).eps * (halved.abs() + b.abs())).all()


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma2", "tiny-gemma4"])
def test_a_frozen_scale_stops_its_gradient(model_pair, name):
    """Freezing ln_final's scale, by a forward hook returning scale.detach() or by a backward hook returning a zero
    gradient, makes the gradient at ln_final's input TransformerLens's frozen-norm one: g * w / s (RMSNorm) or
    centre(g * w) / s (LayerNorm), g the gradient at hook_normalized. The two ways agree at 0.0 (the same
    computation); the float64 formula to 1e-5 relative (float32 rounding)."""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    seed = _seed(model, tokens)
    last = _input_name(model, "ln_final")
    results = []
    for fwd, bwd in ([("ln_final.hook_scale", lambda s, hook: s.detach())], []), \
                    ([], [("ln_final.hook_scale", lambda g, hook: torch.zeros_like(g))]):
        cache, c_fwd, c_bwd = model.get_caching_hooks(names_filter=[last, "ln_final.hook_normalized"], incl_bwd=True)
        with model.hooks(fwd_hooks=c_fwd + fwd, bwd_hooks=c_bwd + bwd):  # no other hook on hook_scale
            (model(tokens, attention_mask=mask) * seed).sum().backward()
        model.zero_grad(set_to_none=True)
        results.append(cache)
    assert torch.equal(results[0][last + "_grad"], results[1][last + "_grad"])
    cache = results[0]
    g = cache["ln_final.hook_normalized_grad"].double() * _gain(model.ln_final)
    if model.cfg.norm == "layernorm":
        g = g - g.mean(-1, keepdim=True)
    expected = g / ops.norm_scale(cache[last].double(), model.ln_final.eps, center=model.cfg.norm == "layernorm")
    torch.testing.assert_close(cache[last + "_grad"].double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())


def _backward_hook_run(model, tokens, mask, seed, bwd: list[str], fwd: list[str] = ()):
    """(logits, parameter gradients, {hook: gradient shapes seen}) with a recording backward hook on each of `bwd`
    and a read-only forward hook on each of `fwd`."""
    seen: dict[str, list] = {name: [] for name in bwd}

    def record(grad, hook):
        seen[hook.name].append(tuple(grad.shape))

    model.zero_grad(set_to_none=True)
    with model.hooks(fwd_hooks=[(name, lambda x, hook: None) for name in fwd],
                     bwd_hooks=[(name, record) for name in bwd]):
        logits = model(tokens, attention_mask=mask)
        (logits.float() * seed).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads, seen


@pytest.mark.parametrize("name,hooks", [
    # sdpa computes no pattern: a backward hook on it must make its layer run eager, as a forward hook does, or it
    # would never fire (the check counted forward hooks only)
    ("tiny-gemma3", ["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_attn_scores"]),
    # the experts fire their per-slot hooks on an assembled copy; an unedited copy used to be dropped, so the
    # gradient never passed through it and a backward hook never fired
    ("tiny-gemma4-moe", ["blocks.0.moe.hook_pre", "blocks.0.moe.hook_pre_linear", "blocks.1.moe.hook_post"]),
])
@pytest.mark.filterwarnings("ignore:a hook \\(or a run_with_cache request\\) on hook_attn_scores")
def test_backward_hooks_fire_where_hooks_see_a_copy(name, hooks):
    from lens_det.parity.models import random_hf_model
    import lens_det

    impl = "sdpa" if name == "tiny-gemma3" else "eager"
    model = lens_det.from_hf_model(random_hf_model(name, attn_implementation=impl))
    tokens, mask = batch("left", model.cfg.d_vocab, length=10)
    seed = _seed(model, tokens)
    logits, grads, seen = _backward_hook_run(model, tokens, mask, seed, hooks)
    assert all(seen[h] for h in hooks), seen
    # the same run with read-only forward hooks on those points (under sdpa: the same layers run eager)
    plain_logits, plain_grads, _ = _backward_hook_run(model, tokens, mask, seed, [], fwd=hooks)
    # Tolerance 0.0: the hooks only read; the forward and the parameter gradients are the same ops' bits (the MoE
    # copy adds value + (copy - copy) = value + 0, and its gradient g + g - g is exactly g)
    assert torch.equal(logits, plain_logits)
    assert max_diff(grads, plain_grads)[0] == 0.0
