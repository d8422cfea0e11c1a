"""Each documented Gemma pitfall (docs/numerics.md §9), injected into a lens_det model, makes the parity check fail.

This shows the 0.0 parity tests can see the mistakes other toolkits shipped.
"""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

import lens_det
from lens_det import ops
from lens_det.components.embed import EmbedScale
from lens_det.config import hf_config_from_name
from lens_det.model import HookedDecoder
from tests.conftest import batch


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

    def llama_order(x, weight, eps, unit_offset, mean_sq=None):
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return y * (1.0 + weight)

    monkeypatch.setattr(ops, "rms_norm", llama_order)
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
