"""lens_det.hooks.HOOK_KINDS against what the models declare and compute: every HookPoint of every family (the
opt-in ones switched on) has an entry, every entry is declared by some family, and each entry's layout matches the
activation's shape axis by axis. The tables that read the registry (the report's head axis, SOURCES, the
invalidated hooks, the opt-in switches) agree with what they replaced."""

from __future__ import annotations

import pytest
import torch

import lens_det
from lens_det.hooks import HOOK_KINDS, OUTPUT_KINDS, hook_kind, opt_in_switch, registry_key
from lens_det.parity.models import random_hf_model
from tests.helpers import ALL

BATCH, POS = 2, 5


D_SAE = 24  # a width no other axis has, so a wrong layout axis cannot match by accident


def _switch_on(model, switches):
    for switch in switches:
        if switch == "add_sae":  # an SAE's hook points exist once one is spliced in
            from lens_det.sae import SAE, SAEConfig

            model.add_sae(SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=D_SAE, hook_name="blocks.1.hook_resid_post")),
                          use_error_term=True)  # hook_sae_error fires with the error term only
        else:
            getattr(model, switch)(True)
    return model


# every family with the opt-in hooks on; hook_attn_in (an alternative to the split q/k/v inputs, refused with
# grouped-query attention) separately on a model whose query and key/value heads match
RUNS = [(name, ("set_use_attn_result", "set_use_hook_mlp_in", "set_use_split_qkv_input")) for name in ALL] + [
    ("tiny-bloom", ("set_use_attn_in",)), ("tiny-vaultgemma", ("set_use_attn_in",)), ("tiny-gemma2", ("add_sae",))]


@pytest.fixture(scope="module")
def runs():
    """{(family, switches): (model, {hook name: activation})} for RUNS, one run_with_cache each (own models, so
    the session's shared ones keep their switches off)."""
    out = {}
    for name, switches in RUNS:
        model = _switch_on(lens_det.from_hf_model(random_hf_model(name, torch.float32)), switches)
        tokens = torch.randint(0, model.cfg.d_vocab, (BATCH, POS), generator=torch.Generator().manual_seed(0))
        logits, cache = model.run_with_cache(tokens)
        out[(name, switches)] = (model, {**dict(cache.items()), "logits": logits})
    return out


def _sizes(model, name: str) -> dict[str, int]:
    """The size each layout axis name stands for at hook `name` (per layer where Gemma varies it)."""
    cfg = model.config
    sizes = {"batch": BATCH, "pos": POS, "key_pos": POS, "one": 1, "d_model": cfg.d_model, "d_vocab": cfg.d_vocab,
             "head": cfg.n_heads, "layer": cfg.n_layers, "d_ple": cfg.d_per_layer_input,
             "expert": cfg.n_experts, "top_k": cfg.n_experts_per_token, "d_expert": cfg.d_mlp_expert,
             "d_in": cfg.d_model, "d_sae": D_SAE, "d_out": cfg.d_model,
             "stream": cfg.n_streams, "stream_from": cfg.n_streams, "d_laurel": cfg.laurel_rank}
    if name.startswith("blocks."):
        layer = int(name.split(".")[1])
        attn = model.blocks[layer].attn
        sizes |= {"kv_head": attn.n_kv_heads, "d_head": attn.d_head,
                  "d_mlp": cfg.d_mlp_per_layer[layer] if cfg.d_mlp_per_layer else cfg.d_mlp}
    return sizes


def test_every_declared_hook_point_has_an_entry_and_every_entry_is_declared(runs):
    declared = {registry_key(name) for model, _ in runs.values() for name in model.hook_dict}
    assert sorted(declared - set(HOOK_KINDS)) == []  # a HookPoint without its registry entry
    assert sorted(set(HOOK_KINDS) - declared) == []  # an entry no family declares (stale or misspelt)


def test_every_hook_fires_with_its_switch_on(runs):
    """The opt-in switches turn every declared hook on: nothing the registry describes is left unchecked by the
    shape test below (hook_attn_in and the split q/k/v inputs are alternatives, so each run lacks the other)."""
    fired = {registry_key(name) for _, acts in runs.values() for name in acts}
    assert sorted(set(HOOK_KINDS) - fired) == []


@pytest.mark.parametrize("run", RUNS, ids=[f"{n}-{'+'.join(s)}" for n, s in RUNS])
def test_each_layout_matches_the_activation_shape(runs, run):
    """ndim and the size of every named axis; exact integers, no tolerance."""
    model, acts = runs[run]
    for name, act in acts.items():
        kind, sizes = hook_kind(name), _sizes(model, name)
        want = tuple(sizes[axis] for axis in kind.layout)
        assert (name, tuple(act.shape)) == (name, want), kind.layout


def test_derived_axes():
    """What the report, patching, determinism and generation read, for one hook of each layout shape."""
    q, pattern, resid, v_scale = (hook_kind(n) for n in ("blocks.3.attn.hook_q", "blocks.0.attn.hook_pattern",
                                                         "hook_embed", "blocks.1.attn.v_norm.hook_scale"))
    assert (q.pos_axis, q.head_axis, q.key_axis, q.position_axes) == (1, 2, None, (1,))
    assert (pattern.pos_axis, pattern.head_axis, pattern.key_axis, pattern.position_axes) == (2, 1, 3, (2, 3))
    assert (resid.pos_axis, resid.head_axis) == (1, None)
    assert v_scale.head_axis == 2
    assert hook_kind("blocks.0.moe.hook_pre").head_axis is None  # a top-k slot is no head


def test_heads_match_the_report_table_it_replaced():
    """The report's old _PER_HEAD set and QUERY_KEY_HOOKS, recomputed from the registry."""
    old_per_head = {"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_rot_q", "attn.hook_rot_k",
                    "attn.hook_result", *(f"attn.{norm}.{hook}" for norm in ("q_norm", "k_norm", "v_norm")
                                          for hook in ("hook_scale", "hook_normalized")),
                    "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input"}
    per_head = {k.removeprefix("blocks.") for k, kind in HOOK_KINDS.items()
                if kind.head_axis is not None and kind.key_axis is None}
    assert per_head == old_per_head
    assert {k for k, kind in HOOK_KINDS.items() if kind.key_axis is not None} == {
        "blocks.attn.hook_attn_scores", "blocks.attn.hook_pattern"}


def test_invalidated_by_is_what_each_processing_step_changes():
    """The registry's invalidated_by, per step, as the processing steps define them (docs: what each step rewrites);
    changed_hooks (read by compare) is the registry's view."""
    from lens_det.weight_processing import CHANGED_HOOKS, changed_hooks

    assert CHANGED_HOOKS == {
        "fold_ln": {"ln1.hook_normalized", "ln2.hook_normalized", "ln_final.hook_normalized"},
        "center_writing_weights": {"hook_embed", "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in",
                                   "hook_mlp_out", "hook_resid_post", "attn.hook_result"},
        "center_unembed": {"logits"},
        "fold_value_biases": {"attn.hook_v", "attn.hook_z", "attn.hook_result"},
        "refactor_factored_attn_matrices": {"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z",
                                            "attn.hook_result"},
    }
    assert changed_hooks(["fold_value_biases", "refactor_factored_attn_matrices"])["attn.hook_z"] == "fold_value_biases"


def test_opt_in_switches(runs):
    """Each opt-in switch and flag: off by default in a fresh model, and the flag names the block attribute."""
    from operator import attrgetter

    switched = {k: kind for k, kind in HOOK_KINDS.items() if kind.opt_in is not None}
    assert {k: kind.opt_in for k, kind in switched.items()} == {
        "blocks.hook_attn_in": "model.set_use_attn_in(True)",
        "blocks.hook_q_input": "model.set_use_split_qkv_input(True)",
        "blocks.hook_k_input": "model.set_use_split_qkv_input(True)",
        "blocks.hook_v_input": "model.set_use_split_qkv_input(True)",
        "blocks.attn.hook_result": "model.set_use_attn_result(True)",
        "blocks.hook_mlp_in": "model.set_use_hook_mlp_in(True)"}
    assert opt_in_switch("blocks.2.attn.hook_result") == "model.set_use_attn_result(True)"
    assert opt_in_switch("blocks.2.attn.hook_q") is None
    model, _ = runs[("tiny-bloom", ("set_use_attn_in",))]
    assert attrgetter(switched["blocks.hook_attn_in"].opt_in_flag)(model.blocks[0]) is True
    assert attrgetter(switched["blocks.attn.hook_result"].opt_in_flag)(model.blocks[0]) is False


def test_sources_cover_every_hook_kind():
    from lens_det.parity import SOURCES

    assert set(SOURCES) == set(HOOK_KINDS)
    assert all(source.split(":")[0] in ("module", "derived", "attention", "attention/derived", "call", "none")
               for source in SOURCES.values())


def test_an_unknown_name_says_where_to_add_it():
    with pytest.raises(KeyError, match="lens_det.hooks.HOOK_KINDS"):
        hook_kind("blocks.0.attn.hook_nonexistent")
    assert set(OUTPUT_KINDS) == {"logits", "log_probs"}


def test_patching_refuses_a_head_on_a_hook_without_heads():
    """A 4-D hook without heads (MoE's per-slot expert activations [batch, pos, top_k, d_expert]) used to have its
    slot axis patched as if it were heads; the registry's layout says it has none."""
    from lens_det.patching import patch_hook, patch_sweep

    model = lens_det.from_hf_model(random_hf_model("tiny-gemma4-moe", torch.float32))
    tokens = torch.randint(0, model.cfg.d_vocab, (1, POS), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens)
    name = "blocks.0.moe.hook_pre"
    with pytest.raises(ValueError, match="has no head dimension; patch it by position only"):
        model.run_with_hooks(tokens, fwd_hooks=[(name, patch_hook(model, cache[name], head=1))])
    with pytest.raises(ValueError, match="has no head dimension; use by='pos'"):
        patch_sweep(model, tokens, tokens, lambda logits: logits[0, -1, 0], hook="moe.hook_pre", by="head")
