"""Gemma 4's mixture of experts (enable_moe_block) beyond what the parametrized suites run on tiny-gemma4-moe
(HF's default experts implementation): HF's "eager" experts too, the switch between them, the router's hooks,
interventions on the routing and per-slot activations, other expert counts, the multimodal class, loading and the
CLI (docs/numerics.md §6.11; the router pitfalls are in test_pitfalls.py)."""

import pytest
import torch
from transformers import AutoConfig, Gemma4Config, Gemma4ForConditionalGeneration

import lens_det
from lens_det.config import resolve_name
from lens_det.parity import compare
from lens_det.parity.models import random_hf_model, random_hf_model_from_config
from tests.helpers import DTYPES, batch
from tests.helpers import assert_bit_identical

NAME = "tiny-gemma4-moe"
IMPLEMENTATIONS = ["grouped_mm", "eager"]



@pytest.fixture(scope="module")
def pairs():
    built = {}

    def get(implementation, dtype):
        if (implementation, dtype) not in built:
            hf = random_hf_model(NAME, dtype, experts_implementation=implementation)
            built[(implementation, dtype)] = hf, lens_det.from_hf_model(hf)
        return built[(implementation, dtype)]
    return get


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_both_experts_implementations_are_bit_identical(pairs, implementation, dtype, chunk):
    """Every hook at tolerance 0.0 against HF configured with the same experts implementation, left padding,
    uncached and through the KV cache."""
    hf, model = pairs(implementation, dtype)
    assert hf.config._experts_implementation == implementation == model.experts_implementation
    assert_bit_identical(hf, model, chunk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("n_experts, top_k, d_expert", [(4, 1, 16), (3, 3, 8), (16, 4, 24)])
def test_other_expert_counts_and_top_k(implementation, dtype, n_experts, top_k, d_expert):
    """top-1 (renormalised to 1), every expert chosen (top-k = n_experts), and 16 experts (in the cached steps of
    2 tokens some are never chosen: HF's eager loop skips them, grouped_mm gives them empty groups)."""
    fields = dict(resolve_name(NAME)["hf_config"]) | {"num_experts": n_experts, "top_k_experts": top_k,
                                                     "moe_intermediate_size": d_expert}
    hf_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf = random_hf_model_from_config(hf_cfg, dtype, seed=1, experts_implementation=implementation)
    model = lens_det.from_hf_model(hf)
    assert (model.cfg.n_experts, model.cfg.n_experts_per_token) == (n_experts, top_k)
    assert_bit_identical(hf, model, chunk=2)


def test_hf_default_is_grouped_mm_and_is_copied():
    hf = random_hf_model(NAME)
    assert hf.config._experts_implementation == "grouped_mm"  # transformers' default when none is asked for
    assert lens_det.from_hf_model(hf).experts_implementation == "grouped_mm"
    assert lens_det.from_config(NAME).experts_implementation == "grouped_mm"
    assert lens_det.from_config("tiny-gemma4").experts_implementation is None
    assert lens_det.from_config(NAME, experts_implementation="eager").experts_implementation == "eager"


def test_from_pretrained_takes_experts_implementation(tmp_path):
    """A checkpoint directory carries no experts implementation: lens_det then runs HF's default, or the one asked
    for, matching HF loaded the same way."""
    from transformers import AutoModelForCausalLM

    random_hf_model(NAME, torch.bfloat16).save_pretrained(tmp_path)
    tokens, mask = batch("left", 128)
    for implementation in (None, "eager"):
        model = lens_det.from_pretrained(tmp_path, dtype=torch.bfloat16, experts_implementation=implementation)
        assert model.experts_implementation == (implementation or "grouped_mm")
        extra = {} if implementation is None else {"experts_implementation": implementation}
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, **extra)
        with torch.no_grad():
            ref = hf(tokens, attention_mask=mask, use_cache=False).logits
            assert torch.equal(model(tokens, attention_mask=mask), ref)


def test_the_implementations_round_differently_and_compare_refuses_a_mismatch(pairs):
    """In bf16 the eager loop rounds each expert's weighted output to bf16 and adds in bf16, grouped_mm sums the k
    outputs in fp32 and rounds once: the MoE outputs differ, so the switch matters and compare checks it."""
    hf, model = pairs("eager", torch.bfloat16)
    tokens, mask = batch("left", model.cfg.d_vocab)
    model.experts_implementation = "grouped_mm"
    try:
        with pytest.raises(ValueError, match="experts_implementation='eager'"):
            compare(model, hf, tokens, mask)
        with torch.no_grad():
            ours = model(tokens, attention_mask=mask)
            ref = hf(tokens, attention_mask=mask, use_cache=False).logits
        assert not torch.equal(ours, ref)
    finally:
        model.experts_implementation = "eager"


def test_experts_implementation_is_validated(pairs):
    _, model = pairs("grouped_mm", torch.float32)
    with pytest.raises(ValueError, match="must be one of"):
        model.experts_implementation = "batched_mm"
    with pytest.raises(ValueError, match="no mixture of experts"):
        lens_det.from_config("tiny-gemma4").experts_implementation = "eager"


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_conditional_generation_text_part(implementation):
    """Gemma4ForConditionalGeneration (the 26B-A4B's class): the experts implementation is read from the text
    config, where HF applies it."""
    fields = dict(resolve_name(NAME)["hf_config"])
    cfg = Gemma4Config(text_config=fields, vision_config=None, audio_config=None)
    hf = random_hf_model_from_config(cfg, torch.bfloat16, model_class=Gemma4ForConditionalGeneration,
                                     experts_implementation=implementation)
    model = lens_det.from_hf_model(hf)
    assert model.experts_implementation == implementation and model.cfg.n_experts == 6
    assert_bit_identical(hf, model, chunk=4)


def test_router_hooks(pairs):
    """Shapes and dtypes; the chosen experts are the top-k of hook_expert_weights and the weights are their
    renormalised probabilities times the per-expert scale."""
    _, model = pairs("grouped_mm", torch.bfloat16)
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
def test_routing_interventions(pairs, implementation):
    """Edits of the chosen experts and their weights are what the experts use: zero weights silence the MoE
    output; sending every token to one expert equals that expert's weight-sum times its output."""
    _, model = pairs(implementation, torch.float32)
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
def test_per_slot_activation_hooks(pairs, implementation, deterministic):
    """hook_pre / hook_pre_linear / hook_post are [batch, pos, k, d_mlp_expert], the chosen expert's gate, up and
    act(gate) * up at each (token, slot) (checked against that expert's weights), and an edit is what the expert
    then uses: zeroing hook_post silences the MoE output, an edit of one slot changes only that token."""
    _, model = pairs(implementation, torch.float32)
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


def test_cli_parity_with_each_experts_implementation(tmp_path, capsys):
    from lens_det.cli import main

    for implementation in IMPLEMENTATIONS:
        out = tmp_path / f"{implementation}.json"
        assert main(["parity", "--model", NAME, "--dtype", "bfloat16", "--experts-implementation", implementation,
                     "--json", str(out)]) == 0
        assert "PASS" in capsys.readouterr().out and out.exists()
    with pytest.raises(SystemExit):
        main(["parity", "--model", NAME, "--experts-implementation", "batched_mm"])


def test_grouped_mm_fallback_cases_are_refused(pairs, monkeypatch):
    """Where transformers would run its own per-group loop instead of torch's grouped GEMM (here: torch <= 2.8 on
    CPU), lens_det refuses rather than compute something else."""
    from lens_det.components import moe

    _, model = pairs("grouped_mm", torch.float32)
    tokens, mask = batch("none", model.cfg.d_vocab)
    monkeypatch.setattr(moe, "_torch_version", lambda: (2, 8))
    with pytest.raises(NotImplementedError, match="per-group loop"):
        model(tokens, attention_mask=mask)
    with lens_det.deterministic():  # the deterministic path does not use grouped_mm
        model(tokens, attention_mask=mask)
