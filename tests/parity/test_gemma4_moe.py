"""Gemma 4's mixture of experts (enable_moe_block) beyond what the parametrized suites run on tiny-gemma4-moe
(HF's default experts implementation): HF's "eager" experts too, the switch between them, other expert counts and
the multimodal class (docs/numerics.md §6.11; the router pitfalls are in test_pitfalls.py). The router and
per-slot hooks: tests/hooks/test_moe_hooks.py; loading and refusals: tests/api/test_experts_implementation.py;
the CLI: tests/api/test_cli_gemma4.py."""

import pytest
import torch
from transformers import AutoConfig, Gemma4Config, Gemma4ForConditionalGeneration

import lens_det
from lens_det.config import resolve_name
from lens_det.parity import compare
from lens_det.parity.models import random_hf_model_from_config
from tests.helpers import DTYPES, EXPERTS_IMPLEMENTATIONS, MOE, assert_bit_identical, batch

NAME = MOE
IMPLEMENTATIONS = EXPERTS_IMPLEMENTATIONS


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_both_experts_implementations_are_bit_identical(moe_pairs, implementation, dtype, chunk):
    """Every hook at tolerance 0.0 against HF configured with the same experts implementation, left padding,
    uncached and through the KV cache."""
    hf, model = moe_pairs(implementation, dtype)
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


def test_the_implementations_round_differently_and_compare_refuses_a_mismatch(moe_pairs):
    """In bf16 the eager loop rounds each expert's weighted output to bf16 and adds in bf16, grouped_mm sums the k
    outputs in fp32 and rounds once: the MoE outputs differ, so the switch matters and compare checks it."""
    hf, model = moe_pairs("eager", torch.bfloat16)
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
