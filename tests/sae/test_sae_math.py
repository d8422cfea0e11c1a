"""SAE encode / decode against the formulas of lens_det.sae.sae's docstring, written out here in plain torch.

Exactness: most tests use "dyadic" weights and inputs (small integers / 4, in float64). Every product and partial
sum of those is a multiple of 1/16 far below 2**53, so it is exact in float64 whatever the summation order (BLAS
blocking, fused bias): the reference and lens_det must then agree at tolerance 0.0 even though the op sequence
differs. test_gaussian_weights_close uses ordinary Gaussian weights, where the order of the d_in-term sums does
differ (F.linear's addmm vs matmul-then-add), and states its tolerance there.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lens_det.sae import SAE, SAEConfig

F64 = torch.float64


def dyadic(gen: torch.Generator, *shape, low: int = -8, high: int = 9) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=gen).to(F64) / 4


def make_sae(cfg: SAEConfig, seed: int = 0, dtype=F64) -> SAE:
    """An SAE with dyadic random weights (threshold in [0, 2])."""
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            value = dyadic(gen, *p.shape, low=0) if name == "threshold" else dyadic(gen, *p.shape)
            p.copy_(value.to(dtype))
    return sae


# --- the reference, independent of lens_det ---
def ref_pre(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    centred = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    return centred @ sae.W_enc + sae.b_enc


def ref_acts(sae: SAE, pre: torch.Tensor) -> torch.Tensor:
    arch = sae.cfg.architecture
    if arch == "relu":
        return pre.clamp(min=0)
    if arch == "jumprelu":
        return torch.where(pre > sae.threshold, pre.clamp(min=0), torch.zeros_like(pre))
    out = torch.zeros_like(pre)
    rows, flat = pre.reshape(-1, pre.shape[-1]), out.view(-1, pre.shape[-1])
    for r in range(rows.shape[0]):
        values = rows[r].tolist()
        chosen = sorted(range(len(values)), key=lambda j: (-values[j], j))[: sae.cfg.k]  # ties: lower index
        for j in chosen:
            flat[r, j] = max(values[j], 0.0)
    return out


def ref_recon(sae: SAE, acts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    recon = acts @ sae.W_dec + sae.b_dec
    return recon + x @ sae.W_skip if sae.cfg.skip else recon


def check_exact(sae: SAE, x: torch.Tensor) -> None:
    """lens_det's pre, acts and reconstruction == the reference, 0.0 (dyadic values: module docstring)."""
    seen = {}
    sae.hook_sae_acts_pre.add_hook(lambda t, hook: seen.setdefault("pre", t.clone()))
    try:
        acts = sae.encode(x)
    finally:
        sae.hook_sae_acts_pre.remove_hooks()
    pre = ref_pre(sae, x)
    assert torch.equal(seen["pre"], pre)
    assert torch.equal(acts, ref_acts(sae, pre))
    recon = sae.decode(acts, x) if sae.cfg.skip else sae.decode(acts)
    assert torch.equal(recon, ref_recon(sae, acts, x))
    assert torch.equal(sae(x), recon)


def cfg(**kw) -> SAEConfig:
    base = {"d_in": 12, "d_sae": 40, "hook_name": "blocks.0.hook_resid_post", "architecture": "relu"}
    return SAEConfig(**(base | kw))


def inputs(d_in: int, seed: int = 1, shape=(2, 5)) -> torch.Tensor:
    return dyadic(torch.Generator().manual_seed(seed), *shape, d_in)


@pytest.mark.parametrize("arch,k", [("relu", None), ("jumprelu", None), ("topk", 7), ("topk", 1), ("topk", 40)])
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_encode_decode_exact(arch, k, apply_b_dec):
    sae = make_sae(cfg(architecture=arch, k=k, apply_b_dec_to_input=apply_b_dec))
    check_exact(sae, inputs(12))


def test_topk_sparsity_count():
    """topk keeps at most k non-zeros per position; with k == d_sae every positive pre-activation is kept."""
    sae = make_sae(cfg(architecture="topk", k=5))
    acts = sae.encode(inputs(12))
    assert int((acts != 0).sum(-1).max()) <= 5
    full = make_sae(cfg(architecture="topk", k=40))
    x = inputs(12)
    assert torch.equal(full.encode(x), ref_pre(full, x).clamp(min=0))


def test_topk_ties_go_to_lower_index():
    """Exact ties at the k-th value: the lowest feature indices win."""
    sae = SAE(cfg(d_in=2, d_sae=8, architecture="topk", k=3), dtype=F64)
    with torch.no_grad():  # pre = x0 * w + x1 * 0: features 1, 3, 4, 6 tie at 2.0, feature 5 is 5.0
        sae.W_enc[0] = torch.tensor([1.0, 2.0, 0.0, 2.0, 2.0, 5.0, 2.0, -1.0], dtype=F64)
    acts = sae.encode(torch.tensor([[1.0, 0.0]], dtype=F64))
    assert acts.tolist() == [[0.0, 2.0, 0.0, 2.0, 0.0, 5.0, 0.0, 0.0]]


def test_topk_negative_values_in_top_k_are_zero():
    sae = SAE(cfg(d_in=1, d_sae=4, architecture="topk", k=3), dtype=F64)
    with torch.no_grad():
        sae.W_enc[0] = torch.tensor([1.0, -2.0, -3.0, -0.5], dtype=F64)
    assert sae.encode(torch.ones(1, 1, dtype=F64)).tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_jumprelu_threshold_is_strict():
    """A pre-activation exactly at its threshold is off; one ulp above it is on."""
    sae = SAE(cfg(d_in=1, d_sae=4, architecture="jumprelu"), dtype=F64)
    above = math.nextafter(0.5, 1.0)
    with torch.no_grad():
        sae.W_enc[0] = torch.tensor([0.5, above, 0.25, 2.0], dtype=F64)
        sae.threshold.copy_(torch.tensor([0.5, 0.5, 0.5, 0.0], dtype=F64))
    assert sae.encode(torch.ones(1, 1, dtype=F64)).tolist() == [[0.0, above, 0.0, 2.0]]


def test_jumprelu_negative_threshold_still_relu():
    """relu(pre) * (pre > threshold): a negative pre above a negative threshold stays 0."""
    sae = SAE(cfg(d_in=1, d_sae=2, architecture="jumprelu"), dtype=F64)
    with torch.no_grad():
        sae.W_enc[0] = torch.tensor([-0.5, 0.5], dtype=F64)
        sae.threshold.fill_(-1.0)
    assert sae.encode(torch.ones(1, 1, dtype=F64)).tolist() == [[0.0, 0.5]]


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_d_out_ne_d_in(arch, skip):
    """A transcoder (d_out 20 != d_in 12), with and without the skip x @ W_skip (W_skip [d_in, d_out])."""
    sae = make_sae(cfg(architecture=arch, d_out=20, skip=skip, hook_name="blocks.0.ln2.hook_normalized",
                       hook_name_out="blocks.0.hook_mlp_out"))
    assert sae.W_dec.shape == (40, 20) and sae.b_dec.shape == (20,)
    if skip:
        assert sae.W_skip.shape == (12, 20)
    check_exact(sae, inputs(12))
    assert sae(inputs(12)).shape == (2, 5, 20)


def test_skip_decode_needs_input():
    sae = make_sae(cfg(d_out=20, skip=True, hook_name_out="blocks.0.hook_mlp_out"))
    with pytest.raises(ValueError, match=r"decodes from its input too: call decode\(acts, x\)"):
        sae.decode(sae.encode(inputs(12)))


def test_skip_term_is_x_at_w_skip():
    """Only W_skip non-zero: the reconstruction is exactly x @ W_skip."""
    sae = SAE(cfg(d_out=3, skip=True, hook_name_out="blocks.0.hook_mlp_out"), dtype=F64)
    x = inputs(12)
    with torch.no_grad():
        sae.W_skip.copy_(dyadic(torch.Generator().manual_seed(3), 12, 3))
    assert torch.equal(sae(x), x @ sae.W_skip)


def test_gaussian_weights_close():
    """Gaussian float64 weights: the d_in- and d_sae-term sums round in a different order in F.linear (addmm,
    BLAS blocking) than in matmul + add, so pre and recon agree to rounding only: |diff| <= 1e-12 (the sums are
    O(10) with 64 terms; float64 rounding of such sums is ~1e-14). Activations are checked exactly from lens_det's
    own pre-activation (same op sequence: a comparison and a max), so no gate can flip on rounding."""
    gen = torch.Generator().manual_seed(5)
    for arch, k in [("relu", None), ("jumprelu", None), ("topk", 9)]:
        sae = SAE(cfg(d_in=64, d_sae=64, architecture=arch, k=k, apply_b_dec_to_input=True), dtype=F64)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
        x = torch.randn(3, 4, 64, generator=gen, dtype=F64)
        pre = sae._pre(x)
        torch.testing.assert_close(pre, ref_pre(sae, x), rtol=0, atol=1e-12)
        acts = sae.encode(x)
        assert torch.equal(acts, ref_acts(sae, pre))
        torch.testing.assert_close(sae.decode(acts), ref_recon(sae, acts, x), rtol=0, atol=1e-12)


def test_bf16_sae_casts_fp32_input():
    """A bf16 SAE fed fp32 input computes in bf16: the same bits as feeding it x.to(bf16)."""
    sae = make_sae(cfg(architecture="jumprelu"), dtype=torch.bfloat16)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(0))
    acts = sae.encode(x)
    assert acts.dtype == torch.bfloat16 and sae(x).dtype == torch.bfloat16
    assert torch.equal(acts, sae.encode(x.to(torch.bfloat16)))
    assert torch.equal(sae(x), sae(x.to(torch.bfloat16)))


def test_wrong_width_input_refused():
    with pytest.raises(ValueError, match=r"reads width d_in=12, got a tensor of shape \(2, 5, 11\)"):
        make_sae(cfg()).encode(torch.zeros(2, 5, 11, dtype=F64))


@pytest.mark.parametrize("kw,message", [
    ({"architecture": "gated"}, r"SAE architecture 'gated' is not implemented \(implemented: relu, jumprelu, topk"),
    ({"architecture": "standard"}, r"SAELens' 'standard' is 'relu'"),
    ({"architecture": "topk"}, r"a topk SAE needs an integer k in \[1, d_sae=40\], got k=None"),
    ({"architecture": "topk", "k": 0}, r"needs an integer k in \[1, d_sae=40\], got k=0"),
    ({"architecture": "topk", "k": 41}, r"got k=41"),
    ({"architecture": "topk", "k": 2.0}, r"got k=2.0"),
    ({"d_sae": 0}, r"SAE widths must be positive"),
    ({"d_in": -1}, r"SAE widths must be positive"),
])
def test_config_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        cfg(**kw)


def test_apply_b_dec_needs_square():
    with pytest.raises(ValueError, match="apply_b_dec_to_input needs d_out == d_in"):
        SAE(cfg(d_out=20, apply_b_dec_to_input=True, hook_name_out="blocks.0.hook_mlp_out"))


# --- property tests: random widths, architectures, k and dyadic weights against the reference ---
@st.composite
def sae_cases(draw):
    d_in, d_sae = draw(st.integers(1, 16)), draw(st.integers(1, 64))
    arch = draw(st.sampled_from(["relu", "jumprelu", "topk"]))
    k = draw(st.integers(1, d_sae)) if arch == "topk" else None
    transcoder = draw(st.booleans())
    d_out = draw(st.integers(1, 16)) if transcoder else None
    skip = transcoder and draw(st.booleans())
    apply_b_dec = (not transcoder or d_out == d_in) and draw(st.booleans())
    # narrow value ranges make exact ties (topk) and pre == threshold (jumprelu) common
    span = draw(st.sampled_from([1, 2, 8]))
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    c = cfg(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, d_out=d_out, skip=skip,
            apply_b_dec_to_input=apply_b_dec, hook_name_out="blocks.0.hook_mlp_out" if transcoder else None)
    return c, span, shape, draw(st.integers(0, 2**31 - 1))


def _property(case):
    c, span, shape, seed = case
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(c, dtype=F64)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(dyadic(gen, *p.shape, low=0 if name == "threshold" else -span, high=span + 1))
    check_exact(sae, dyadic(gen, *shape, c.d_in, low=-span, high=span + 1))


COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


@settings(max_examples=25, derandomize=True, **COMMON)
@given(sae_cases())
def test_property_matches_reference(case):
    _property(case)


@pytest.mark.slow
@settings(max_examples=300, **COMMON)
@given(sae_cases())
def test_property_matches_reference_long(case):
    _property(case)
