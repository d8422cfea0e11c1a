"""Gemma 4's mixture of experts (tiny-gemma4-moe): the router's hooks, interventions on the routing, and the
per-slot expert activation hooks, with each experts implementation. Parity with HF: tests/parity/test_gemma4_moe.py."""

import pytest
import torch

from tests.helpers import EXPERTS_IMPLEMENTATIONS, batch

IMPLEMENTATIONS = EXPERTS_IMPLEMENTATIONS


def test_router_hooks(moe_pairs):
    """Shapes and dtypes; the chosen experts are the top-k of hook_expert_weights and the weights are their
    renormalised probabilities times the per-expert scale."""
    _, model = moe_pairs("grouped_mm", torch.bfloat16)
    tokens, mask = batch("left", model.cfg.d_vocab)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    b, t = tokens.shape
    moe = model.blocks[1].moe
    logits, probs = cache["blocks.1.moe.hook_router_logits"], cache["blocks.1.moe.hook_expert_weights"]
    indices, weights = cache["blocks.1.moe.hook_expert_indices"], cache["blocks.1.moe.hook_top_k_weights"]
    assert logits.shape == probs.shape == (b, t, 6) and logits.dtype == torch.bfloat16
    assert probs.dtype == weights.dtype == torch.float32 and indices.dtype == torch.int64
    assert indices.shape == weights.shape == (b, t, 2)
    chosen = probs.gather(-1, indices)
    assert torch.equal(chosen, probs.topk(2, dim=-1).values)
    expected = chosen / chosen.sum(-1, keepdim=True) * moe.per_expert_scale[indices]
    assert torch.equal(weights, expected)
    for name in ("hook_dense_mlp_out", "hook_moe_out", "moe.hook_out"):
        assert cache[f"blocks.1.{name}"].shape == (b, t, model.cfg.d_model)
    assert torch.equal(cache["blocks.1.ln2_post.hook_normalized"], cache["blocks.1.hook_mlp_out"])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_routing_interventions(moe_pairs, implementation):
    """Edits of the chosen experts and their weights are what the experts use: zero weights silence the MoE
    output; sending every token to one expert equals that expert's weight-sum times its output."""
    _, model = moe_pairs(implementation, torch.float32)
    tokens, mask = batch("none", model.cfg.d_vocab)

    def zero(x, hook):
        return torch.zeros_like(x)
    with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.moe.hook_top_k_weights", zero)]):
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert not cache["blocks.0.moe.hook_out"].any()

    def expert_3(x, hook):
        return torch.full_like(x, 3)
    with torch.no_grad():
        with model.hooks(fwd_hooks=[("blocks.0.moe.hook_expert_indices", expert_3)]):
            _, cache = model.run_with_cache(tokens, attention_mask=mask)
        moe = model.blocks[0].moe
        x = cache["blocks.0.ln2_moe.hook_normalized"]
        gate, up = torch.nn.functional.linear(x, moe.w_gate_up[3]).chunk(2, dim=-1)
        one = torch.nn.functional.linear(moe.act(gate) * up, moe.w_out[3])
        expected = one * cache["blocks.0.moe.hook_top_k_weights"].sum(-1, keepdim=True)
    torch.testing.assert_close(cache["blocks.0.moe.hook_out"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_per_slot_activation_hooks(moe_pairs, implementation, deterministic):
    """hook_pre / hook_pre_linear / hook_post are [batch, pos, k, d_mlp_expert], the chosen expert's gate, up and
    act(gate) * up at each (token, slot) (checked against that expert's weights), and an edit is what the expert
    then uses: zeroing hook_post silences the MoE output, an edit of one slot changes only that token."""
    _, model = moe_pairs(implementation, torch.float32)
    tokens, mask = batch("none", model.cfg.d_vocab)
    b, t = tokens.shape
    moe = model.blocks[2].moe
    model.deterministic = deterministic
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, attention_mask=mask)
            pre, up, post = (cache[f"blocks.2.moe.hook_{n}"] for n in ("pre", "pre_linear", "post"))
            assert pre.shape == up.shape == post.shape == (b, t, 2, 32)
            x, idx = cache["blocks.2.ln2_moe.hook_normalized"], cache["blocks.2.moe.hook_expert_indices"]
            gate_up = torch.einsum("btd,btkod->btko", x, moe.w_gate_up[idx])
            torch.testing.assert_close(torch.cat([pre, up], -1), gate_up, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(post, moe.act(pre) * up)

            def zero(value, hook):
                return torch.zeros_like(value)
            with model.hooks(fwd_hooks=[("blocks.2.moe.hook_post", zero)]):
                _, edited = model.run_with_cache(tokens, attention_mask=mask)
            assert not edited["blocks.2.moe.hook_out"].any()

            def one_slot(value, hook):
                value[1, 4, 0] += 1.0  # in place, TransformerLens's patching idiom
            with model.hooks(fwd_hooks=[("blocks.2.moe.hook_pre", one_slot)]):
                _, edited = model.run_with_cache(tokens, attention_mask=mask)
            changed = (edited["blocks.2.moe.hook_out"] != cache["blocks.2.moe.hook_out"]).any(-1)
            assert changed.nonzero().tolist() == [[1, 4]]
    finally:
        model.deterministic = False
