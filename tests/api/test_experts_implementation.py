"""The experts_implementation of Gemma 4's mixture of experts (tiny-gemma4-moe): HF's default is copied, from_config
and from_pretrained take one, a bad value is refused, and so are the cases where transformers would not run torch's
grouped GEMM. Parity with HF under each implementation: tests/parity/test_gemma4_moe.py."""

import pytest
import torch

import lens_det
from lens_det.parity.models import random_hf_model
from tests.helpers import MOE, batch

NAME = MOE


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


def test_experts_implementation_is_validated(moe_pairs):
    _, model = moe_pairs("grouped_mm", torch.float32)
    with pytest.raises(ValueError, match="must be one of"):
        model.experts_implementation = "batched_mm"
    with pytest.raises(ValueError, match="no mixture of experts"):
        lens_det.from_config("tiny-gemma4").experts_implementation = "eager"


def test_grouped_mm_fallback_cases_are_refused(moe_pairs, monkeypatch):
    """Where transformers would run its own per-group loop instead of torch's grouped GEMM (here: torch <= 2.8 on
    CPU), lens_det refuses rather than compute something else."""
    from lens_det.components import moe

    _, model = moe_pairs("grouped_mm", torch.float32)
    tokens, mask = batch("none", model.cfg.d_vocab)
    monkeypatch.setattr(moe, "_torch_version", lambda: (2, 8))
    with pytest.raises(NotImplementedError, match="per-group loop"):
        model(tokens, attention_mask=mask)
    with lens_det.deterministic():  # the deterministic path does not use grouped_mm
        model(tokens, attention_mask=mask)
