"""Which hook points a hook lands on, and what a hook may return (issue 19, item 8a and the hook dtype error).

One rule for add_hook, run_with_hooks and hooks(): a hook by exact name on a point that does not fire with the
current settings (model.disabled_hook_points()) raises with the switch to call; a filter function matches only the
points that fire. A hook must return None or a tensor of the shape, dtype and device it was given: an fp32 SAE
reconstruction in a bf16 model is refused at the hook, with the cast to write, instead of failing inside torch.
"""

import pytest
import torch

import lens_det

MODEL = lens_det.from_config("tiny-gemma2", seed=0)
TOKENS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
DISABLED = "blocks.0.attn.hook_result"


def _firing():
    return set(MODEL.hook_dict) - set(MODEL.disabled_hook_points())


def _add_hook(model, name, fn):
    try:
        model.add_hook(name, fn)
        with torch.no_grad():
            model(TOKENS)
    finally:
        model.reset_hooks()


def _run_with_hooks(model, name, fn):
    with torch.no_grad():
        model.run_with_hooks(TOKENS, fwd_hooks=[(name, fn)])


def _hooks_context(model, name, fn):
    with torch.no_grad(), model.hooks(fwd_hooks=[(name, fn)]):
        model(TOKENS)


WAYS = {"add_hook": _add_hook, "run_with_hooks": _run_with_hooks, "hooks()": _hooks_context}


@pytest.mark.parametrize("way", WAYS)
def test_a_filter_matches_only_the_hook_points_that_fire(way):
    assert DISABLED in MODEL.disabled_hook_points()
    seen = []
    WAYS[way](MODEL, lambda name: True, lambda x, hook: seen.append(hook.name))
    assert set(seen) == _firing() and len(seen) == len(_firing())  # each firing point once, no disabled one
    MODEL.set_use_attn_result(True)
    try:
        seen.clear()
        WAYS[way](MODEL, lambda name: name.endswith("attn.hook_result"), lambda x, hook: seen.append(hook.name))
        assert seen == [f"blocks.{i}.attn.hook_result" for i in range(MODEL.cfg.n_layers)]
    finally:
        MODEL.set_use_attn_result(False)
    assert all(not hp._forward_hooks for hp in MODEL.hook_dict.values())


@pytest.mark.parametrize("way", WAYS)
def test_an_exact_name_on_a_disabled_point_raises_with_the_switch(way):
    with pytest.raises(ValueError, match=r"hook_result does not fire.*call model\.set_use_attn_result\(True\)"):
        WAYS[way](MODEL, DISABLED, lambda x, hook: x)
    assert all(not hp._forward_hooks for hp in MODEL.hook_dict.values())


@pytest.mark.parametrize("way", WAYS)
def test_an_unknown_hook_name_says_which_names_exist(way):
    with pytest.raises(ValueError, match=r"'blocks\.0\.hook_resid_psot' is not a hook point.*hook_resid_post"):
        WAYS[way](MODEL, "blocks.0.hook_resid_psot", lambda x, hook: x)


HOOKS = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.mlp.hook_post", "blocks.0.ln1.hook_scale",
         "ln_final.hook_normalized"]


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma2"])
@pytest.mark.parametrize("hook_name", HOOKS)
def test_a_hook_that_returns_another_dtype_is_refused_with_the_cast(name, hook_name):
    """bf16 model; hook_scale is fp32 in every model (a bf16 edit of it is refused the same way)."""
    model = lens_det.from_config(name, seed=0, dtype=torch.bfloat16)
    given = {}

    def other_dtype(x, hook):
        given["dtype"] = x.dtype
        return x.to(torch.bfloat16 if x.dtype == torch.float32 else torch.float32)

    with torch.no_grad(), pytest.raises(ValueError, match=rf"hook on {hook_name} returned a torch\.\w+ tensor.*"
                                                          r"given torch\.\w+.*\.to\(tensor\.dtype\)"):
        model.run_with_hooks(TOKENS, fwd_hooks=[(hook_name, other_dtype)])
    if given["dtype"] == torch.bfloat16:  # cast back as the message says: bf16 -> fp32 -> bf16 is lossless, so
        with torch.no_grad():             # the edit runs and changes no bit (same ops: tolerance 0.0)
            cast_back = model.run_with_hooks(TOKENS, fwd_hooks=[(hook_name, lambda x, hook: x.float().to(x.dtype))])
            assert torch.equal(cast_back, model(TOKENS))


def test_a_hook_that_returns_another_device_is_refused_with_the_move():
    with torch.no_grad(), pytest.raises(ValueError, match=r"hook on blocks\.0\.hook_resid_post returned a tensor on "
                                                          r"meta.*given one on cpu.*\.to\(tensor\.device\)"):
        MODEL.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x.to("meta"))])
