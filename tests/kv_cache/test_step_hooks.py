"""`step_hooks` mean the same with the cache on and off.

Step t's hooks edit the positions that are new at step t (the prompt at step 0, the one new position at t > 0)
and the edit persists, because later positions read it: with the cache through the stored keys and values,
without it because every later uncached forward applies step t's hooks again to those positions. Hooks see the
same tensors either way (same positions, same `model.query_start`; scores and patterns over the keys the cached
step attends to).

Tolerances: deterministic mode makes cached and uncached forwards bitwise equal (docs/determinism.md), so there
tokens, logits and every tensor a hook sees are compared at 0.0; in the default mode the uncached forward over
the whole sequence and the cached one-token step round differently (fp32 prefill-vs-decode matmul shapes,
tests/kv_cache/test_generate.py), so tokens are equal and logits / hook inputs agree to 1e-4 of their scale.
"""

import pytest
import torch

import lens_det
from lens_det.components.hooks import QUERY_KEY_HOOKS
from lens_det.patching import generate_with_patches, patch_hook
from tests.helpers import ALL, batch

PROMPT, STEPS = 8, 6


def close(a, b, det):
    return torch.equal(a, b) if det else bool((a - b).abs().max() <= 1e-4 * b.abs().max())


def real_positions(x, name, query_start, mask):
    """x at its real (unpadded) positions. A left pad is a fully masked query, which attends uniformly to every
    key present (HF eager, docs/numerics.md §1.3), so its values depend on how many keys a forward has."""
    x = x.transpose(1, 2) if name.endswith(QUERY_KEY_HOOKS) else x
    return x[mask[:, query_start : query_start + x.shape[1]].bool()]


def recording_step_hooks(model, seen):
    """Edits at steps 0, 2, 3 and 4 (residual, values of a layer that stores them, a pattern, the last block), each
    recording (step, hook name, query_start, shape) -> the tensors it was called on."""
    gen = torch.Generator().manual_seed(0)
    shift = torch.randn(model.cfg.d_model, generator=gen)
    producer = next(i for i in range(model.cfg.n_layers) if model.config.layer_kv_source(i) is None)
    last = model.cfg.n_layers - 1  # on tiny-gemma4-ple a KV-sharing layer (the tail that runs on the last position)

    def hook(step, edit):
        def fn(x, hook):
            seen.setdefault((step, hook.name, model.query_start, tuple(x.shape)), []).append(x.clone())
            return edit(x)
        return fn

    return {
        0: [("blocks.0.hook_resid_post", hook(0, lambda x: x + shift)),
            (f"blocks.{last}.hook_resid_mid", hook(0, lambda x: x - shift))],
        2: [(f"blocks.{producer}.attn.hook_v", hook(2, lambda v: 3 * v))],
        3: [("blocks.0.attn.hook_pattern", hook(3, lambda p: 0.5 * p))],
        4: [(f"blocks.{last}.hook_resid_pre", hook(4, lambda x: x + 2 * shift))],
    }


@pytest.mark.parametrize("det", [True, False], ids=["deterministic", "default"])
@pytest.mark.parametrize("name", ALL)
def test_step_hooks_same_with_and_without_the_cache(model_pair, name, det):
    """(Before: without the cache a step-t edit hit every position once and was then dropped; greedy tokens
    differed from the cached run on tiny-gemma3 and tiny-gemma4-ple.)"""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    runs, seen = {}, {}
    for cached in (True, False):
        seen[cached] = {}
        with lens_det.deterministic(det):
            runs[cached] = model.generate(tokens, mask, max_new_tokens=STEPS, stop_tokens=[], use_kv_cache=cached,
                                          step_hooks=recording_step_hooks(model, seen[cached]))
    plain = model.generate(tokens, mask, max_new_tokens=STEPS, stop_tokens=[])
    assert not torch.equal(torch.stack(runs[True].logits), torch.stack(plain.logits))  # the edits bite
    assert torch.equal(runs[True].tokens, runs[False].tokens)
    assert all(close(a, b, det) for a, b in zip(runs[False].logits, runs[True].logits))
    assert seen[True].keys() == seen[False].keys()  # the same hooks, positions and shapes
    mask = runs[True].attention_mask
    for (step, name, start, shape), calls in seen[True].items():
        assert len(calls) == 1  # with the cache each step's hooks run once; without it again at every later step
        want = real_positions(calls[0], name, start, mask)
        assert all(close(real_positions(again, name, start, mask), want, det)
                   for again in seen[False][step, name, start, shape])


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma2", "tiny-gemma3"])
def test_patch_hook_during_generation_same_with_and_without_the_cache(model_pair, name):
    """lens_det.patching.patch_hook (absolute positions, read through model.query_start) at a generated position
    and on a sliding-window layer's pattern with key positions: cache on and off agree (deterministic mode, 0.0)."""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab, length=PROMPT)
    total = PROMPT + STEPS
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(3, total, model.cfg.n_key_value_heads, model.cfg.d_head, generator=gen)
    pattern = torch.rand(3, model.cfg.n_heads, total, total, generator=gen)
    patches = {2: [("blocks.0.attn.hook_v", patch_hook(model, values, position=PROMPT + 1))],
               4: [("blocks.0.attn.hook_pattern", patch_hook(model, pattern, position=PROMPT + 3,
                                                             key_position=[PROMPT, PROMPT + 2]))]}
    with lens_det.deterministic():
        on, off = (generate_with_patches(model, tokens, mask, patches=patches, max_new_tokens=STEPS,
                                         stop_tokens=[], use_kv_cache=cached) for cached in (True, False))
        plain = model.generate(tokens, mask, max_new_tokens=STEPS, stop_tokens=[])
    assert not torch.equal(on.logits[3], plain.logits[3]) and not torch.equal(on.logits[5], plain.logits[5])
    assert torch.equal(on.tokens, off.tokens)
    assert all(torch.equal(a, b) for a, b in zip(on.logits, off.logits))
