"""Every hook point and the logits are bit-identical (max |diff| = 0.0) to HF eager, uncached.

Tolerance 0.0: HF eager is reproducible bit for bit in fp32 and bf16, padded or not, pad
positions included, when the same ops run in the same order; any difference is a bug.
"""

import pytest
import torch

import lens_det
from lens_det.parity import capture_reference, compare
from tests.helpers import ALL, BLOOM, DTYPES, GEMMA, batch

PADDINGS = ["none", "left", "right", "inner"]


def assert_bit_identical(model, hf, tokens, mask, positions=None):
    """compare() at tolerance 0: uncached, and cached with the whole batch as one prefill."""
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.set_use_split_qkv_input(True)
    try:
        report = compare(model, hf, tokens, mask, positions, prefill=tokens.shape[1], decode_steps=0)
    finally:
        model.set_use_attn_result(False)
        model.set_use_hook_mlp_in(False)
        model.set_use_split_qkv_input(False)
    n_hooks = len(model.hook_dict) - model.cfg.n_layers  # all but hook_attn_in (the alternative to q/k/v_input)
    assert report.n_hooks == n_hooks and report.coverage == 1.0, report.missing
    assert len(report.rows) == 2 * (n_hooks + 1)  # every hook plus the logits, twice
    assert report.passed and report.max_abs() == 0.0, report.to_text()


@pytest.mark.parametrize("name", BLOOM + ["tiny-gemma"])
def test_hook_attn_in_bit_identical(model_pair, name):
    """hook_attn_in (TL's per-head copy of resid_pre, the alternative to hook_q/k/v_input) equals HF's decoder
    layer input per head, and firing it leaves every other hook bit-identical; cache on and off."""
    hf, model = model_pair(name)
    if model.cfg.n_rep > 1:
        pytest.skip("GQA: hook_attn_in is refused (tests/tl/test_tl_compat.py)")
    tokens, mask = batch("left", model.cfg.d_vocab)
    model.set_use_attn_in(True)
    try:
        report = compare(model, hf, tokens, mask, prefill=9, decode_steps=3, chunk=2)
    finally:
        model.set_use_attn_in(False)
    assert "blocks.1.hook_attn_in" in {r.hook for r in report.rows} and report.coverage == 1.0
    assert report.passed and report.max_abs() == 0.0, report.to_text()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("name", BLOOM)
def test_bloom_every_hook_bit_identical(model_pair, name, padding, dtype):
    hf, model = model_pair(name, dtype)
    tokens, mask = batch(padding, model.cfg.d_vocab)
    assert_bit_identical(model, hf, tokens, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("positions", ["arange", "mask"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", GEMMA)
def test_gemma_every_hook_bit_identical(model_pair, name, padding, positions, dtype):
    """Default positions are compared with HF forward's default (arange); mask-derived ones with the
    same position_ids passed to HF (what generate uses)."""
    hf, model = model_pair(name, dtype)
    tokens, mask = batch(padding, model.cfg.d_vocab)
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask, position_ids=positions)
    hf_positions = lens_det.positions_from_mask(mask) if positions == "mask" else None
    assert_bit_identical(model, hf, tokens, mask, hf_positions)
    ref_logits, _ = capture_reference(hf, model.config, tokens, mask, hf_positions)
    assert torch.equal(ours, ref_logits)  # the "arange"/"mask" options equal HF's default / explicit positions


@pytest.mark.parametrize("name", ALL)
def test_pad_rows_are_finite_and_equal_hf(model_pair, name):
    """Left-pad query rows are fully masked: HF eager gives uniform attention there (docs/numerics.md §1.3);
    never NaN."""
    hf, model = model_pair(name, torch.float32)
    tokens, mask = batch("left", model.cfg.d_vocab)
    mask[2] = 0  # a row with no real token at all
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
        ref = hf(tokens, attention_mask=mask, use_cache=False).logits
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ALL)
def test_left_padded_row_equals_prompt_alone(model_pair, name, dtype):
    """Positions come from the mask: Bloom always (ALiBi), Gemma with position_ids="mask".

    CPU matmul and elementwise kernels round a row differently when the tensor has another number of rows
    (docs/determinism.md), so the padded call (16 rows) and the call alone (11 rows) can differ in the last bits;
    HF has exactly the same difference, so both sides must equal HF's bit for bit, and the gap must stay at
    rounding level: fp32 < 1e-4; bf16 within 16 bf16 epsilons (2**-8) of the logit scale (measured: 0 on the
    AVX2 / AVX-512 paths, 5.3 epsilons for tiny-gemma4-ple on ATEN_CPU_CAPABILITY=default, whose elementwise
    kernels are not position-invariant). A wrong position or mask is O(scale) off. The deterministic mode removes
    the gap (tests/determinism).
    """
    hf, model = model_pair(name, dtype)
    tokens, mask = batch("left", model.cfg.d_vocab)
    rope = model.cfg.positional == "rope"
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask, position_ids="mask" if rope else None)
        alone = model(tokens[:1, 5:], position_ids="mask" if rope else None)
        kw = {"position_ids": lens_det.positions_from_mask(mask)} if rope else {}
        hf_padded = hf(tokens, attention_mask=mask, use_cache=False, **kw).logits
        hf_alone = hf(tokens[:1, 5:], use_cache=False).logits
    assert torch.equal(padded, hf_padded) and torch.equal(alone, hf_alone)
    gap = (padded[0, 5:].double() - alone[0].double()).abs().max().item()
    if dtype == torch.bfloat16:
        assert gap <= 16 * 2**-8 * alone.abs().max().item()
    else:
        assert gap < 1e-4


@pytest.mark.parametrize("name", ALL)
def test_pad_token_id_is_never_masked(model_pair, name):
    """A real token whose id equals the pad id is a real token: only the mask decides."""
    _, model = model_pair(name, torch.float32)
    pad = model.cfg.pad_token_id
    tokens, _ = batch("none", model.cfg.d_vocab, batch_size=1)
    other = tokens.clone()
    tokens[0, 4], other[0, 4] = pad, (pad + 1) % model.cfg.d_vocab
    with torch.no_grad():
        a, b = model(tokens), model(other)
    assert not torch.equal(a[0, 4:], b[0, 4:])  # the pad-id token is attended to
    assert torch.equal(a[0, :4], b[0, :4])  # causality: earlier positions do not see it
