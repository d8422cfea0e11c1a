"""Each documented Gemma pitfall (docs/numerics.md §9), injected into a lens_det model, makes the parity check fail.

This shows the 0.0 parity tests can see the mistakes other toolkits shipped.
"""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

import lens_det
from lens_det import ops
from lens_det.parity import faults
from lens_det.components.embed import EmbedScale
from lens_det.config import hf_config_from_name
from lens_det.model import HookedDecoder
from tests.helpers import batch


def logit_gap(model, hf, tokens, mask) -> float:
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
        ref = hf(tokens, attention_mask=mask, use_cache=False).logits
    return (ours.double() - ref.double()).abs().max().item()


def with_config(model, **changes):
    """The same weights under a changed config (the injected fault)."""
    other = HookedDecoder(dataclasses.replace(model.config, **changes), dtype=model.cfg.dtype)
    other.load_state_dict(model.state_dict())
    return other


def test_flipping_which_gemma2_layers_slide_fails(model_pair):
    hf, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab)  # 16 tokens, window 4: several windows
    flipped = tuple("full_attention" if t == "sliding_attention" else "sliding_attention"
                    for t in model.cfg.layer_types)
    assert logit_gap(model, hf, tokens, mask) == 0.0
    assert logit_gap(with_config(model, layer_types=flipped), hf, tokens, mask) > 1e-3


def test_sliding_window_off_by_one_fails(model_pair):
    hf, model = model_pair("tiny-gemma2")
    tokens, mask = batch("none", model.cfg.d_vocab)
    assert logit_gap(with_config(model, sliding_window=model.cfg.sliding_window + 1), hf, tokens, mask) > 1e-3


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_head_dim_scale_instead_of_query_pre_attn_scalar_fails(model_pair, name):
    hf, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    assert model.cfg.attn_scale != model.cfg.d_head**-0.5
    assert logit_gap(with_config(model, attn_scale=model.cfg.d_head**-0.5), hf, tokens, mask) > 1e-3


def test_casting_before_the_unit_offset_multiply_fails(model_pair, monkeypatch):
    """Llama order, cast to bf16 then multiply by (1 + w) in bf16, instead of Gemma's fp32 multiply."""
    hf, model = model_pair("tiny-gemma2", torch.bfloat16)
    tokens, mask = batch("left", model.cfg.d_vocab)
    assert logit_gap(model, hf, tokens, mask) == 0.0

    # rms_norm's gain step in Llama's order: the normalised fp32 x cast to the dtype, then times (1 + w) in it
    monkeypatch.setattr(ops, "times_gain", lambda y, weight, unit_offset, like: y.to(like.dtype) * (1.0 + weight))
    assert logit_gap(model, hf, tokens, mask) > 1e-2


def test_exact_embedding_scale_instead_of_dtype_cast_fails(monkeypatch):
    """sqrt(72) = 8.485 is 8.5 in bf16; HF multiplies by the bf16 value (docs/numerics.md §3.2)."""
    hf_cfg = hf_config_from_name("tiny-gemma")
    hf_cfg.hidden_size = 72
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    model = lens_det.from_hf_model(hf)
    tokens, mask = batch("none", model.cfg.d_vocab)
    assert logit_gap(model, hf, tokens, mask) == 0.0
    monkeypatch.setattr(EmbedScale, "forward", lambda self, x: (x.float() * 72**0.5).to(x.dtype))
    assert logit_gap(model, hf, tokens, mask) > 1e-2


def test_gemma1_norm_roles(model_pair):
    """Gemma 1's post_attention_layernorm is the pre-MLP norm: swapping ln1/ln2 weights breaks parity."""
    hf, model = model_pair("tiny-gemma")
    tokens, mask = batch("none", model.cfg.d_vocab)
    swapped = with_config(model)
    with torch.no_grad():
        ln1 = swapped.blocks[0].ln1.w.clone()
        swapped.blocks[0].ln1.w.copy_(swapped.blocks[0].ln2.w)
        swapped.blocks[0].ln2.w.copy_(ln1)
    assert logit_gap(swapped, hf, tokens, mask) > 1e-3


# --- Gemma 4 (docs/numerics.md §6) ---

@pytest.mark.parametrize("fault, dtype", [
    *[(f, d) for f in ("rmsnorm_unit_offset", "full_rope_instead_of_partial", "missing_v_norm")
      for d in (torch.float32, torch.bfloat16)],
    ("rmsnorm_reciprocal_sqrt", torch.float32),
], ids=str)
def test_gemma4_pitfalls_fail(model_pair, fault, dtype):
    """Gemma 4's RMSNorm gain is w (not 1 + w) and its 1/sqrt is pow(., -0.5) (x / sqrt(.) rounds differently);
    full layers rotate only a fraction of the frequency pairs; values pass a weightless RMSNorm."""
    hf, model = model_pair("tiny-gemma4", dtype)
    tokens, mask = batch("left", model.cfg.d_vocab)
    assert logit_gap(model, hf, tokens, mask) == 0.0
    with getattr(faults, fault)(model):
        gap = logit_gap(model, hf, tokens, mask)
    if fault == "rmsnorm_reciprocal_sqrt":  # a rounding-level fault: an fp32 ulp (checked in fp32 only: the bf16
        assert gap > 0.0  # cast absorbed it on ATEN_CPU_CAPABILITY=default)
    else:  # the others change the function
        assert gap > 1e-3
    assert logit_gap(model, hf, tokens, mask) == 0.0  # the fault is undone on exit


def test_gemma4_pow_and_rsqrt_agree_on_this_cpu(model_pair):
    """HF's Gemma4RMSNorm uses torch.pow(ms + eps, -0.5) on purpose ("compiler differences between Torch and JAX");
    lens_det runs pow too. On x86 CPU with torch 2.13, fp32 pow(x, -0.5) and rsqrt give the same bits, so an rsqrt
    implementation would pass here: this test records that, so a parity pass on CPU is not read as proof that
    rsqrt is safe on other devices."""
    hf, model = model_pair("tiny-gemma4")
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 10 + 1e-6
    tokens, mask = batch("left", model.cfg.d_vocab)
    with faults.rmsnorm_rsqrt(model):
        gap = logit_gap(model, hf, tokens, mask)
    assert torch.equal(torch.pow(x, -0.5), torch.rsqrt(x)) == (gap == 0.0)


def test_gemma4_layer_scalar_matters(model_pair):
    """Gemma 4 multiplies each block's output by a learned scalar; dropping it breaks parity."""
    hf, model = model_pair("tiny-gemma4")
    tokens, mask = batch("left", model.cfg.d_vocab)
    scalars = [float(b.layer_scalar) for b in model.blocks]
    assert all(s != 1.0 for s in scalars) and len(set(scalars)) == len(scalars)  # random, non-trivial
    unscaled = with_config(model)
    with torch.no_grad():
        for block in unscaled.blocks:
            block.layer_scalar.fill_(1.0)
    assert logit_gap(unscaled, hf, tokens, mask) > 1e-3


def test_gemma4_kv_sharing_reads_past_plus_new(model_pair):
    """KV-sharing consumers attend to their source layer's keys/values after its cache update (past + new); a
    consumer that reads only the new tokens' keys is right without a cache and wrong on every later cached step
    (compare's cached steps catch it; the uncached pass does not)."""
    from lens_det.parity import compare

    hf, model = model_pair("tiny-gemma4-ple")
    tokens, mask = batch("left", model.cfg.d_vocab)
    with faults.kv_sharing_new_keys_only(model):
        report = compare(model, hf, tokens, mask, lens_det.positions_from_mask(mask), prefill=5, chunk=3)
    assert not report.passed
    first = report.first_divergence
    assert first.step.startswith("cached:") and first.step != "cached:0" and first.layer == 5
    assert all(row.passed for row in report.rows if row.step == "uncached")


def test_gemma4_kv_sharing_layers_run_on_kept_positions(model_pair):
    """With logits_to_keep HF runs the KV-sharing layers on the kept positions only: running them on every position
    computes the same function with other matmul shapes, so the kept fp32 logits (and HF generate's first step)
    are not HF's bits."""
    hf, model = model_pair("tiny-gemma4-ple")
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    pos = lens_det.positions_from_mask(mask)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits
        assert torch.equal(model(tokens, attention_mask=mask, position_ids=pos, logits_to_keep=1), ref)
        with faults.kv_consumers_run_every_position(model):
            wrong = model(tokens, attention_mask=mask, position_ids=pos, logits_to_keep=1)
    assert 0 < (wrong - ref).abs().max() < 1e-4


def test_gemma4_per_layer_inputs_scale(model_pair):
    """Per-layer embeddings are (projection + token table) * 2**-0.5. Each block's PLE sub-block ends in an RMSNorm,
    which is scale-invariant up to its eps, so a missing scale changes the logits only slightly: a tolerance-based
    check would pass it, the bitwise one does not."""
    hf, model = model_pair("tiny-gemma4-ple")
    tokens, mask = batch("left", model.cfg.d_vocab)
    with faults.per_layer_inputs_unscaled(model):
        assert 0.0 < logit_gap(model, hf, tokens, mask) < 1e-2
    assert logit_gap(model, hf, tokens, mask) == 0.0


def test_vaultgemma_has_no_post_norms(model_pair):
    """VaultGemma is Gemma 2 without the post-attention / post-feedforward norms: adding them (unit-gain norms,
    w = 0 with the 1 + w offset) breaks parity."""
    hf, model = model_pair("tiny-vaultgemma")
    tokens, mask = batch("left", model.cfg.d_vocab)
    assert not model.cfg.post_attn_norm and not model.cfg.post_mlp_norm
    sandwich = HookedDecoder(dataclasses.replace(model.config, post_attn_norm=True, post_mlp_norm=True))
    sandwich.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for block in sandwich.blocks:
            block.ln1_post.w.zero_()
            block.ln2_post.w.zero_()
    assert logit_gap(sandwich, hf, tokens, mask) > 1e-3


# --- Gemma 4 mixture of experts (docs/numerics.md §6.11, §9.16) ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fault", ["router_softmax_in_model_dtype", "router_without_renormalisation",
                                   "router_without_per_expert_scale", "router_without_root_size",
                                   "router_reads_normed_input"])
def test_gemma4_moe_pitfalls_fail(model_pair, fault, dtype):
    """The router's softmax is fp32 (HF asks for it; in an fp32 model there is nothing to see), its top-k weights
    are renormalised and scaled per expert, its input is scaled by d_model ** -0.5 and is the un-normed residual."""
    hf, model = model_pair("tiny-gemma4-moe", dtype)
    tokens, mask = batch("left", model.cfg.d_vocab)
    assert logit_gap(model, hf, tokens, mask) == 0.0
    with getattr(faults, fault)(model):
        gap = logit_gap(model, hf, tokens, mask)
    if fault == "router_softmax_in_model_dtype" and dtype == torch.float32:
        assert gap == 0.0
    else:
        assert gap > 1e-3
    assert logit_gap(model, hf, tokens, mask) == 0.0  # the fault is undone on exit
