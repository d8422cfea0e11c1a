"""Hooks under torch.compile: after a compiled call without hooks, every hook point fires, edits apply and removed
hooks stop running, through `model.compile()`, `torch.compile(model)` and a compiled function that calls the model,
with the KV cache off and on (docs/numerics.md §12).

torch's default `torch._dynamo.config.skip_nnmodule_hook_guards = True` does not guard a graph compiled while a
module had no hooks against hooks added later, so it kept running without them: run_with_cache returned only the hook
points in frames dynamo had left to eager (18 of tiny-gemma2's 99), edits did not apply, and a decode step reused
the graph of earlier steps without its hook. HookedDecoder.__call__ compiles its frames with hook guards.

Model: tiny-gemma (2 layers, MQA, RMSNorm, sdpa). Besides the HookPoints it has code that branches on whether a hook
is attached (a norm computes hook_scale only when it is hooked; sdpa switches to eager attention when hook_pattern is
hooked), which a stale graph also gets wrong. The "eager" backend runs dynamo's captured graphs op for op on the same
tensors, so every comparison there is exact (tolerance 0.0). Compiling is slow (seconds per hook set on this
machine), so each test checks several things on one compiled model.
"""

from __future__ import annotations

import pytest
import torch

import lens_det

pytestmark = pytest.mark.filterwarnings("ignore:.*hook_pattern")  # sdpa -> eager for a hooked pattern, as uncompiled

NAME = "tiny-gemma"
EDITED = ("blocks.0.hook_resid_mid", "blocks.1.ln2.hook_scale")  # a HookPoint's edit, and a norm's hooked branch
# inductor generates its own fused C++ kernels (re-associated fp32 reductions in the norms and softmax, its own
# vectorised exp / rsqrt), each an ulp-level change. Measured on tiny-gemma fp32 (torch 2.13 CPU, AMD EPYC, AVX-512)
# over every hook point, the edits and the logits: at most 3.6e-7 x the tensor's max |value| (3 float32 eps; e.g.
# 1.5e-7 on hook_v of magnitude 0.41). Tolerance 2e-6 x max |value| (17 eps), 5x the measured worst, for other CPUs.
INDUCTOR_RTOL = 2e-6
BACKENDS = [pytest.param("eager", 0.0, id="eager"),  # inductor: minutes on a cold inductor cache
            pytest.param("inductor", INDUCTOR_RTOL, id="inductor", marks=pytest.mark.slow)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's per-code caches would otherwise fill up with earlier tests' models
    (recompile_limit) and leave frames to eager, which would test nothing."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    assert torch._dynamo.config.skip_nnmodule_hook_guards, "the process-wide dynamo setting was changed"


def tokens_for(model, length: int = 7) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (2, length), generator=torch.Generator().manual_seed(0))


def edit_hooks(calls: list, names=EDITED):
    """Hooks that scale what they see and record that they ran."""
    def scale(x, hook):
        calls.append(hook.name)
        return x * 1.5
    return [(name, scale) for name in names]


def assert_close(got, want, rtol: float, what: str) -> None:
    """|got - want| <= rtol * max|want| (rtol 0: equal)."""
    diff, scale = (got.float() - want.float()).abs().max().item(), want.float().abs().max().item()
    assert diff <= rtol * scale, f"{what}: max |diff| {diff} > {rtol} x {scale}"


def assert_same_cache(got, want, rtol: float) -> None:
    missing = sorted(set(want.keys()) - set(got.keys()))
    assert not missing, f"{len(missing)} of {len(want)} hook points did not fire compiled: {missing[:5]}..."
    for name in want.keys():
        assert_close(got[name], want[name], rtol, name)


def reference(model, tokens):
    """The uncompiled model's logits, its run_with_cache, and its logits under the edit hooks."""
    with torch.no_grad():
        logits = model(tokens)
        _, cache = model.run_with_cache(tokens)
        calls = []
        with model.hooks(fwd_hooks=edit_hooks(calls)):
            edited = model(tokens)
    assert calls == list(EDITED) and not torch.equal(edited, logits)  # the edits change the output
    return logits, cache, edited


def check_compiled(call, model, tokens, ref, rtol: float) -> None:
    """`call` runs the compiled model, after a first call without hooks; hooks are added through `model`, what the
    user holds (the model after model.compile(), the OptimizedModule after torch.compile(model))."""
    logits, cache, edited = ref
    with torch.no_grad():
        assert_close(call(tokens), logits, rtol, "logits, no hooks (the first compiled call)")
        _, got = model.run_with_cache(tokens)
        assert_same_cache(got, cache, rtol)
        calls = []
        with model.hooks(fwd_hooks=edit_hooks(calls)):
            assert_close(call(tokens), edited, rtol, "logits under model.hooks(edits)")
        assert calls == list(EDITED)
        assert_close(call(tokens), logits, rtol, "logits after model.hooks(...) exited")
        assert calls == list(EDITED), "a removed hook still ran"
        assert_close(model.run_with_hooks(tokens, fwd_hooks=edit_hooks(calls)), edited, rtol, "run_with_hooks")
        for name, hook in edit_hooks(calls):
            model.add_hook(name, hook)
        assert_close(call(tokens), edited, rtol, "logits after model.add_hook(edits)")
        model.reset_hooks()
        assert_close(call(tokens), logits, rtol, "logits after model.reset_hooks()")
    assert calls == list(EDITED) * 3, "a hook ran twice, or after reset_hooks"


@pytest.mark.parametrize("backend, rtol", BACKENDS)
def test_model_compile_hooks_fire_edit_and_detach(backend, rtol):
    model = lens_det.from_config(NAME, seed=0)
    tokens = tokens_for(model)
    ref = reference(model, tokens)
    model.compile(backend=backend)
    check_compiled(model, model, tokens, ref, rtol)


def test_torch_compile_and_compiled_callers_hooks_fire_edit_and_detach():
    """torch.compile(model) returns an OptimizedModule that forwards attribute access to the model: opt.hooks(...),
    opt.add_hook and opt.run_with_cache act on the model's hook points, and opt(tokens) is the compiled call
    (opt.run_with_cache / run_with_hooks are the model's methods, so they run it uncompiled). Then a compiled
    function that calls the (uncompiled) model itself, with hooks added on the model."""
    model = lens_det.from_config(NAME, seed=0)
    tokens = tokens_for(model)
    ref = reference(model, tokens)
    opt = torch.compile(model, backend="eager")
    check_compiled(opt, opt, tokens, ref, 0.0)
    caller = torch.compile(lambda t: model(t), backend="eager")
    check_compiled(caller, model, tokens, ref, 0.0)


def run_cached(model, tokens, mask):
    """Prefill 5 tokens, then one-token steps through one KV cache. The third step edits blocks.0's values, which
    the cache stores (so later steps attend to the edit); the steps before it make dynamo compile a graph for any
    cache length (automatic dynamic shapes), which the hooked step would reuse if hooks were not guarded."""
    kv, calls, out = model.new_cache(), [], []
    with torch.no_grad():
        out.append(model(tokens[:, :5], attention_mask=mask[:, :5], kv_cache=kv))
        for step, end in enumerate(range(6, tokens.shape[1] + 1)):
            hooks = edit_hooks(calls, ["blocks.0.attn.hook_v"]) if step == 2 else []
            with model.hooks(fwd_hooks=hooks):
                out.append(model(tokens[:, end - 1 : end], attention_mask=mask[:, :end], kv_cache=kv))
    assert calls == ["blocks.0.attn.hook_v"]
    return out, kv


def test_model_compile_kv_cache_path():
    """Eager attention: under sdpa, HF's sdpa_attention_forward has a compile-only branch (one query with a mask and
    grouped kv heads: repeat_kv instead of pack_gqa, which round differently), taken or not depending on which
    frames dynamo compiles (docs/numerics.md §12); lens_det's eager core has none, so the comparison is exact."""
    model = lens_det.from_config(NAME, seed=0, attn_implementation="eager")
    tokens = tokens_for(model, length=9)  # prefill 5, then 4 steps
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # a left-padded row
    want, want_kv = run_cached(model, tokens, mask)
    model.compile(backend="eager")
    got, got_kv = run_cached(model, tokens, mask)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, 0.0, f"logits of cached call {i}")
    assert torch.equal(got_kv.mask, want_kv.mask)
    for i, (g, w) in enumerate(zip(got_kv.layers, want_kv.layers)):
        assert torch.equal(g.keys, w.keys) and torch.equal(g.values, w.values), f"layer {i}'s cached keys/values"
