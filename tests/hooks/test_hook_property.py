"""Hooks that do not edit never change the forward, property-based (hypothesis).

Drawn: a model (tiny-bloom: LayerNorm, ALiBi, fused QKV; tiny-gemma2: RMSNorm with (1 + w), post-norms,
soft-caps; tiny-gemma4-ple: q/k/v norms, K = V, KV sharing, per-layer embeddings; tiny-gemma4-moe: the MoE block)
in float32 or bfloat16; grad mode on or off; and a random subset of its hook points (all of them, or a few;
opt-in ones that are off, `model.disabled_hook_points()`, left out), each with a random hook: a forward hook that
reads (keeps a copy) and returns None, one that returns None without reading, one that returns a clone, or a
backward hook (TransformerLens's HookPoint registers it with `register_full_backward_hook`, which hands the forward
a new tensor object).

Checked at tolerance 0.0 (bit-identical; the contract is that hooks which do not edit change nothing): the logits
equal the hook-free forward's, and every value a reading hook saw equals that hook point's value in a hook-free
run_with_cache. With grad mode on, the backward then runs, and every backward hook drawn on a norm's hook_scale
fires (hook_scale is on the autograd graph).

The default suite runs a bounded, derandomized set; `pytest -m slow tests/hooks/test_hook_property.py` runs many more.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tests.helpers import batch

FAMILIES = ["tiny-bloom", "tiny-gemma2", "tiny-gemma4-ple", "tiny-gemma4-moe"]
DTYPES = [torch.float32, torch.bfloat16]
KINDS = ["read", "none", "clone", "bwd"]
_REFERENCES: dict = {}  # (name, dtype) -> the hook-free run, computed once per session


def hook_free_run(model, name: str, dtype: torch.dtype):
    """(tokens, mask, logits, cache) of a hook-free forward of a left-padded batch (2 x 12)."""
    if (name, dtype) not in _REFERENCES:
        tokens, mask = batch("left", model.cfg.d_vocab, batch_size=2, length=12)
        with torch.no_grad():
            logits = model(tokens, attention_mask=mask)
            _, cache = model.run_with_cache(tokens, attention_mask=mask)
        _REFERENCES[(name, dtype)] = tokens, mask, logits, cache
    return _REFERENCES[(name, dtype)]


def check_hooks_change_nothing(model_pair, data, name: str, dtype: torch.dtype, grad: bool) -> None:
    _, model = model_pair(name, dtype)
    tokens, mask, free_logits, free_cache = hook_free_run(model, name, dtype)
    off = model.disabled_hook_points()
    names = [n for n in model.hook_dict if n not in off]
    chosen = data.draw(st.one_of(st.just(names), st.lists(st.sampled_from(names), min_size=1, max_size=12,
                                                            unique=True)), label="hook points")
    kinds = data.draw(st.lists(st.sampled_from(KINDS), min_size=len(chosen), max_size=len(chosen)), label="kinds")
    note(f"{name} {dtype} grad={grad}: {dict(zip(chosen, kinds))}")
    seen, fired = {}, set()

    def read(tensor, hook):
        seen[hook.name] = tensor.detach().clone()

    def fire(grad_, hook):
        fired.add(hook.name)

    fwd = {"read": read, "none": lambda tensor, hook: None, "clone": lambda tensor, hook: tensor.clone()}
    fwd_hooks = [(n, fwd[k]) for n, k in zip(chosen, kinds) if k != "bwd"]
    bwd_hooks = [(n, fire) for n, k in zip(chosen, kinds) if k == "bwd"]
    try:
        with torch.set_grad_enabled(grad), model.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            logits = model(tokens, attention_mask=mask)
            if grad:
                logits.float().sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
    assert (logits.float() - free_logits.float()).abs().max().item() == 0.0
    for n, value in seen.items():
        assert torch.equal(value, free_cache[n]), (
            f"{n}: max |diff| {(value.float() - free_cache[n].float()).abs().max()}")
    if grad:
        scales = {n for n, _ in bwd_hooks if n.endswith("hook_scale")}
        assert scales <= fired, f"backward hooks that did not fire: {sorted(scales - fired)}"


COMMON = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DRAWS = dict(data=st.data(), name=st.sampled_from(FAMILIES), dtype=st.sampled_from(DTYPES), grad=st.booleans())


@settings(max_examples=25, derandomize=True, **COMMON)
@given(**DRAWS)
def test_hooks_that_do_not_edit_leave_the_forward_bit_identical(model_pair, data, name, dtype, grad):
    check_hooks_change_nothing(model_pair, data, name, dtype, grad)


@pytest.mark.slow
@settings(max_examples=400, **COMMON)
@given(**DRAWS)
def test_hooks_that_do_not_edit_leave_the_forward_bit_identical_long_run(model_pair, data, name, dtype, grad):
    check_hooks_change_nothing(model_pair, data, name, dtype, grad)
