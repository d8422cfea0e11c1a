"""Unit tests for lens_det.ops: each op against its definition, and each deterministic twin against the default op.

References: where an op must reproduce a torch / HF expression bit for bit (that is the parity contract), the test
runs that expression on the same tensors and asserts equality at 0.0. Where an op is math, a float64 evaluation
of the formula is the reference, with a tolerance stated next to each assertion. Inside `lens_det.deterministic()`
every op must give a row's bits independent of the other rows (and of padding, for the sums over keys): that is
asserted at 0.0; the deterministic twin and the default op may differ by their summation order or code path, within
the stated tolerance.

Tolerance units: fp32 eps = 2**-24 relative rounding; one bf16 ulp is at most 2**-7 relative (8 significant bits).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lens_det
from lens_det import ops

BF16_ULP = 2.0**-7  # one bf16 ulp, relative (upper bound)
DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality (tolerance 0.0), dtype and shape included."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    diff = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert torch.equal(actual, expected), f"max |diff| = {diff}"


# --------------------------------------------------------------------------------------------------------------
# Elementwise ops
# --------------------------------------------------------------------------------------------------------------

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

POINTWISE = {
    # name: (lens_det op, torch's own op it must equal at 0.0, float64 reference formula, input transform)
    "tanh": (ops.tanh, torch.tanh, torch.tanh, lambda x: x),
    "gelu_tanh": (ops.gelu_tanh, lambda x: F.gelu(x, approximate="tanh"),
                  lambda x: 0.5 * x * (1 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3))), lambda x: x),
    "gelu_erf": (ops.gelu_erf, F.gelu, lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0))), lambda x: x),
    "inv_sqrt_pow": (ops.inv_sqrt_pow, lambda x: torch.pow(x, -0.5), lambda x: x**-0.5,
                     lambda x: x.abs() + 1e-3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", POINTWISE)
def test_pointwise_op_is_torchs_op_and_matches_float64(name, dtype):
    op, torch_op, reference, prepare = POINTWISE[name]
    x = prepare(rand(3, 5, 97, dtype=dtype, scale=3.0))
    # Tolerance 0.0: the default op IS torch's op (HF calls the same one).
    assert_equal(op(x), torch_op(x))
    # Tolerance vs float64 of the same (rounded) input: fp32 transcendental kernels are within a few ulp
    # (rtol 1e-6 ~ 16 eps, atol 1e-6 near the zeros); bf16 results are rounded once from an fp32 computation,
    # so within one bf16 ulp.
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (BF16_ULP, 1e-5)
    torch.testing.assert_close(op(x).double(), reference(x.double()), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bloom_gelu_is_hf_bloom_gelu_forward_and_backward(dtype):
    from transformers.models.bloom.modeling_bloom import GeLUFunction, bloom_gelu_forward

    x = rand(4, 7, 33, dtype=dtype, scale=3.0)
    # Tolerance 0.0: the same expression in the same order as HF's bloom_gelu_forward.
    assert_equal(ops.bloom_gelu(x), bloom_gelu_forward(x))
    # Backward: HF's own formula (bloom_gelu_back), not autograd's derivative of the forward. Tolerance 0.0.
    grad = rand(4, 7, 33, dtype=dtype, seed=1)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ops.bloom_gelu(ours).backward(grad)
    GeLUFunction.apply(theirs).backward(grad)
    assert_equal(ours.grad, theirs.grad)


def test_bloom_gelu_matches_float64_formula():
    x = rand(1000, scale=3.0)
    expected = x.double() * 0.5 * (1.0 + torch.tanh(0.79788456 * x.double() * (1 + 0.044715 * x.double() ** 2)))
    # Tolerance: ~8 fp32 roundings in the expression plus tanh's few ulp, on values up to ~10: atol 2e-6.
    torch.testing.assert_close(ops.bloom_gelu(x).double(), expected, rtol=1e-6, atol=2e-6)


TRANSCENDENTAL = {"tanh": torch.tanh, "exp": torch.exp, "cos": torch.cos, "sin": torch.sin,
                  "rsqrt": lambda t: torch.rsqrt(t.abs() + 1e-3), "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
                  "gelu_erf": F.gelu}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TRANSCENDENTAL)
def test_deterministic_pointwise_is_position_invariant(name, dtype):
    """ops.pointwise under deterministic(): an element's bits do not depend on the tensor's size or its place in
    it, including across a SERIAL_PIECE boundary (tolerance 0.0). Without the mode, a lone element takes ATen's
    remainder path: on an AMD EPYC 18 of these first 32 fp32 gelu_erf elements (5 bf16 rsqrt ones) then differ
    from the same elements inside the tensor, so the single-element probes have teeth (32 probes only: each F.gelu
    call enters an OpenMP region, ~20 ms on a loaded 2-core machine). Against the default op: the SIMD body and
    the remainder path differ by 1e-8 to 2e-7 (ops docstring), so rtol 1e-6 / atol 1e-6 in fp32, one ulp in bf16."""
    fn = TRANSCENDENTAL[name]
    n = ops.SERIAL_PIECE + 37
    x = rand(n, dtype=dtype, scale=3.0)
    default = ops.pointwise(fn, x)
    with lens_det.deterministic():
        full = ops.pointwise(fn, x)
        assert_equal(torch.cat([ops.pointwise(fn, x[i : i + 1]) for i in range(32)]), full[:32])
        for start, stop in [(5, 70), (ops.SERIAL_PIECE - 3, ops.SERIAL_PIECE + 3), (n - 9, n)]:
            assert_equal(ops.pointwise(fn, x[start:stop]), full[start:stop])
        # a 2-D view gives the same bits as the flat tensor
        assert_equal(ops.pointwise(fn, x[: 6 * 97].view(6, 97)), full[: 6 * 97].view(6, 97))
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (BF16_ULP, 1e-5)
    torch.testing.assert_close(full, default, rtol=rtol, atol=atol)


def test_pointwise_on_empty_and_single_element_tensors():
    """Edge shapes: no element, one element (padded up to one VECTOR_BLOCK in deterministic mode). Tolerance 0.0
    against torch's op for the empty tensor (nothing to compute) and between the modes for exp(0) = 1 exactly."""
    empty = torch.empty(0, 8)
    with lens_det.deterministic():
        assert_equal(ops.tanh(empty), torch.tanh(empty))
        assert_equal(ops.pointwise(torch.exp, torch.zeros(1)), torch.ones(1))
    assert_equal(ops.pointwise(torch.exp, torch.zeros(1)), torch.ones(1))


def test_activations_are_named_by_act_fn():
    """LensConfig.act_fn names the MLP activation; ops.ACTIVATIONS maps each name to its op."""
    assert ops.ACTIVATIONS == {"bloom_gelu": ops.bloom_gelu, "gelu_tanh": ops.gelu_tanh, "gelu_erf": ops.gelu_erf}


def test_deterministic_context_sets_and_restores_the_mode():
    assert not ops.is_deterministic()
    with lens_det.deterministic():
        assert ops.is_deterministic()
        with lens_det.deterministic(False):
            assert not ops.is_deterministic()
        assert ops.is_deterministic()
    assert not ops.is_deterministic()


# --------------------------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_is_nn_linear(dtype, bias):
    x = rand(2, 9, 96, dtype=dtype)
    w, b = rand(80, 96, dtype=dtype, seed=1, scale=0.1), rand(80, dtype=dtype, seed=2) if bias else None
    # Tolerance 0.0: HF's nn.Linear calls F.linear on the same tensors.
    assert_equal(ops.linear(x, w, b), F.linear(x, w, b))
    expected = x.double() @ w.double().T + (0 if b is None else b.double())
    # Tolerance vs float64: fp32 accumulation of 96 products of size ~0.3: |err| <= 96 * eps * sum|x w| ~ 1e-5;
    # bf16: one rounding of the fp32 accumulator, one bf16 ulp.
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (BF16_ULP, 1e-3)
    torch.testing.assert_close(ops.linear(x, w, b).double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("n_out", [80, 32], ids=["80_outputs", "32_outputs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_linear_is_row_invariant(dtype, n_out):
    """Deterministic linear: a row alone equals the same row in a call of 37 rows, and a [batch, pos] position
    alone equals it inside the 3-D call (tolerance 0.0). Against the default GEMM: another summation order, fp32
    rtol/atol 1e-5 (96 products, see test_linear_is_nn_linear); bf16: both round an fp32 accumulator once, one ulp."""
    x = rand(37, 96, dtype=dtype)
    w, b = rand(n_out, 96, dtype=dtype, seed=1, scale=0.1), rand(n_out, dtype=dtype, seed=2)
    default = ops.linear(x, w, b)
    with lens_det.deterministic():
        batched = ops.linear(x, w, b)
        for i in (0, 5, 6, 7, 8, 36):  # rows 6-7 of an 8-row tile take MKL's edge path without the fix
            assert_equal(ops.linear(x[i : i + 1], w, b), batched[i : i + 1])
        assert_equal(ops.linear(x[3:20], w, b), batched[3:20])
        x3 = x[:36].view(4, 9, 96)
        assert_equal(ops.linear(x3, w, b), batched[:36].view(4, 9, n_out))
        assert_equal(ops.linear(x3[2:3, 4:5], w, b), batched[22:23].view(1, 1, n_out))
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (BF16_ULP, 1e-3)
    torch.testing.assert_close(batched, default, rtol=rtol, atol=atol)


def test_linear_with_no_rows_and_one_row():
    """Edge shapes: zero rows give a [0, out] result in both modes; one row in deterministic mode (padded to a
    ROW_TILE) equals that row computed inside a batch (tolerance 0.0)."""
    w, b = rand(16, 8, seed=1), rand(16, seed=2)
    assert ops.linear(torch.empty(0, 8), w, b).shape == (0, 16)
    with lens_det.deterministic():
        assert ops.linear(torch.empty(0, 8), w, b).shape == (0, 16)
        x = rand(11, 8)
        assert_equal(ops.linear(x[4], w, b), ops.linear(x, w, b)[4])


# --------------------------------------------------------------------------------------------------------------
# Norms and row statistics
# --------------------------------------------------------------------------------------------------------------

def _hf_rms_norm(kind: str, weight: torch.Tensor | None, eps: float) -> torch.nn.Module:
    if kind == "gemma":
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
        module = GemmaRMSNorm(weight.shape[0], eps)
    else:
        from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
        module = Gemma4RMSNorm(64, eps, with_scale=weight is not None)
    if weight is not None:
        module.weight.data = weight.clone()
    return module


RMS_VARIANTS = {
    # name: (HF module kind, has weight, unit_offset, inv_sqrt)
    "gemma (1 + w), rsqrt": ("gemma", True, True, "rsqrt"),
    "gemma4 w, pow": ("gemma4", True, False, "pow"),
    "gemma4 no weight, pow": ("gemma4", False, False, "pow"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", RMS_VARIANTS)
def test_rms_norm_is_hf_rms_norm(variant, dtype):
    kind, has_weight, unit_offset, inv_sqrt = RMS_VARIANTS[variant]
    x = rand(3, 5, 64, dtype=dtype, scale=2.0)
    w = rand(64, dtype=dtype, seed=1, scale=0.5) if has_weight else None
    hf = _hf_rms_norm(kind, w, 1e-6)
    with torch.no_grad():
        # Tolerance 0.0: HF's GemmaRMSNorm / Gemma4RMSNorm, same dtype, same ops in the same order.
        assert_equal(ops.rms_norm(x, w, 1e-6, unit_offset, inv_sqrt=inv_sqrt), hf(x))


@pytest.mark.parametrize("inv_sqrt", ["rsqrt", "pow"])
@pytest.mark.parametrize("unit_offset", [True, False], ids=["1+w", "w"])
def test_rms_norm_matches_float64(unit_offset, inv_sqrt):
    x, w = rand(6, 64, scale=2.0), rand(64, seed=1, scale=0.5)
    xd = x.double()
    gain = (1 + w.double()) if unit_offset else w.double()
    expected = xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * gain
    # Tolerance: fp32 mean of 64 squares plus rsqrt/pow (a few ulp) and two products: rtol 1e-5.
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, unit_offset, inv_sqrt).double(), expected, rtol=1e-5, atol=1e-6)


def test_mean_square_and_norm_scale_match_float64():
    x = rand(4, 3, 96, dtype=torch.bfloat16, scale=2.0)
    xd = x.double()
    ms = ops.mean_square(x)
    # RMSNorm's statistic is fp32 with a kept last dim whatever the input dtype.
    assert ms.dtype == torch.float32 and ms.shape == (4, 3, 1)
    # Tolerance 0.0 against its definition (the spelling HF's RMSNorms use).
    assert_equal(ms, x.float().pow(2).mean(-1, keepdim=True))
    # Tolerance vs float64: bf16 inputs are exact in fp32; 96 fp32 squares summed: rtol 1e-5 (~ 96 eps / 6).
    torch.testing.assert_close(ms.double(), xd.pow(2).mean(-1, keepdim=True), rtol=1e-5, atol=0)
    for center in (True, False):
        centred = xd - xd.mean(-1, keepdim=True) if center else xd
        expected = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        scale = ops.norm_scale(x, 1e-5, center=center)
        assert scale.dtype == torch.float32 and scale.shape == (4, 3, 1)
        torch.testing.assert_close(scale.double(), expected, rtol=1e-5, atol=0)  # same bound as mean_square


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_is_nn_layer_norm_and_matches_float64(dtype):
    x = rand(3, 7, 48, dtype=dtype, scale=2.0)
    w, b = rand(48, dtype=dtype, seed=1), rand(48, dtype=dtype, seed=2)
    hf = torch.nn.LayerNorm(48, eps=1e-5, dtype=dtype)  # Bloom's layer norms: nn.LayerNorm in the model dtype
    hf.weight.data, hf.bias.data = w.clone(), b.clone()
    with torch.no_grad():
        assert_equal(ops.layer_norm(x, w, b, 1e-5), hf(x))  # tolerance 0.0: the same call on the same tensors
    xd = x.double()
    expected = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = expected * w.double() + b.double()
    # Tolerance: fp32 statistics over 48 values then two products: rtol/atol 1e-5; bf16: rounded once at the end
    # from an fp32 computation (ATen's layer_norm accumulates in fp32), one ulp of the outputs (|y| up to ~10).
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (BF16_ULP, 0.05)
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5).double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_row_ops_are_row_invariant(dtype):
    """Norms, bloom_gelu and the MoE router softmax in deterministic mode: a row alone equals the same row in a
    call of 50 rows (tolerance 0.0). Against the default mode (same ops, the transcendental ones on the SIMD
    layout): within 1e-6 relative in fp32 (ops docstring: 1e-8 to 2e-7 apart before the products), one ulp in bf16."""
    x = rand(50, 64, dtype=dtype, scale=2.0)
    w = rand(64, dtype=dtype, seed=1, scale=0.5)
    row_ops = {
        "rms_norm rsqrt": lambda t: ops.rms_norm(t, w, 1e-6, True),
        "rms_norm pow": lambda t: ops.rms_norm(t, w, 1e-6, False, inv_sqrt="pow"),
        "layer_norm": lambda t: ops.layer_norm(t, w, w, 1e-5),
        "norm_scale": lambda t: ops.norm_scale(t, 1e-5, center=True),
        "mean_square": ops.mean_square,
        "softmax_fp32": ops.softmax_fp32,
        "bloom_gelu": ops.bloom_gelu,
    }
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (BF16_ULP, 1e-5)
    for name, op in row_ops.items():
        default = op(x)
        with lens_det.deterministic():
            batched = op(x)
            for i in (0, 13, 49):
                assert_equal(op(x[i : i + 1]), batched[i : i + 1])
        torch.testing.assert_close(batched, default, rtol=rtol, atol=atol, msg=name)


# --------------------------------------------------------------------------------------------------------------
# Attention: scores, softmax, weighted sum
# --------------------------------------------------------------------------------------------------------------

def _qkv(dtype, b=2, h=3, n_q=5, n_k=9, d=16):
    q = rand(b, h, n_q, d, dtype=dtype)
    return q, rand(b, h, n_k, d, dtype=dtype, seed=1), rand(b, h, n_k, d, dtype=dtype, seed=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_scores_are_hf_eager_and_bloom_baddbmm(dtype):
    q, k, _ = _qkv(dtype)
    scale = 0.25
    # Gemma (HF eager_attention_forward): matmul(q, k^T) * scaling. Tolerance 0.0.
    assert_equal(ops.attention_scores(q, k, scale), torch.matmul(q, k.transpose(2, 3)) * scale)
    # Bloom (BloomAttention.forward): alibi.baddbmm(batch1=q, batch2=k^T, beta=1, alpha=inv_norm_factor). 0.0.
    b, h, n_q, d = q.shape
    bias = rand(b * h, 1, k.shape[2], dtype=dtype, seed=3)
    hf = bias.baddbmm(batch1=q.reshape(b * h, -1, d), batch2=k.reshape(b * h, -1, d).transpose(-1, -2),
                      beta=1.0, alpha=scale).view(b, h, n_q, -1)
    assert_equal(ops.attention_scores(q, k, scale, bias), hf)
    expected = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    # Tolerance vs float64: 16 products in fp32 (rtol/atol 1e-5); bf16: one rounding of an fp32 accumulator.
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (BF16_ULP, 1e-2)
    torch.testing.assert_close(ops.attention_scores(q, k, scale).double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("with_bias", [False, True], ids=["rope", "alibi"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_attention_scores_are_batch_and_query_invariant(dtype, with_bias):
    """Deterministic scores: a batch row alone, and a chunk of query rows alone, equal the same scores in the full
    call (tolerance 0.0), with more keys than one KEY_BLOCK. Against the default op: fp32 within 1e-5 (another
    summation order over 16 products); bf16: the default rounds alpha * QK^T (+ bias) once, the twin rounds the
    scores and then the sum with the bias, so up to two bf16 roundings (2 ulp of values up to ~|bias| + 4)."""
    q, k, _ = _qkv(dtype, n_q=11, n_k=ops.KEY_BLOCK + 13)
    b, h, n_k = q.shape[0], q.shape[1], k.shape[2]
    bias = rand(b * h, 1, n_k, dtype=dtype, seed=3) if with_bias else None
    default = ops.attention_scores(q, k, 0.25, bias)
    with lens_det.deterministic():
        full = ops.attention_scores(q, k, 0.25, bias)
        row_bias = None if bias is None else bias.view(b, h, 1, n_k)[1].reshape(h, 1, n_k)
        assert_equal(ops.attention_scores(q[1:2], k[1:2], 0.25, row_bias), full[1:2])
        assert_equal(ops.attention_scores(q[:, :, 3:8], k, 0.25, bias), full[:, :, 3:8])
        assert_equal(ops.attention_scores(q[:, :, 10:], k, 0.25, bias), full[:, :, 10:])
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (2 * BF16_ULP, 2 * BF16_ULP * 8)
    torch.testing.assert_close(full, default, rtol=rtol, atol=atol)


def _masked_scores(dtype, pads: int, n_real: int, seed=0):
    """Scores [1, 2, 3, pads + n_real] whose first `pads` keys are masked with finfo.min (as HF's eager mask
    does after the add), and the keys' real-token indices (-1 for pads)."""
    real = rand(1, 2, 3, n_real, dtype=dtype, seed=seed, scale=2.0)
    masked = torch.full((1, 2, 3, pads), torch.finfo(dtype).min, dtype=dtype)
    key_pos = torch.cat([torch.full((pads,), -1), torch.arange(n_real)])[None]
    return torch.cat([masked, real], dim=-1), key_pos


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_is_hf_softmax_and_matches_float64(dtype):
    scores, _ = _masked_scores(dtype, pads=3, n_real=20)
    probs = ops.softmax(scores)
    # Tolerance 0.0: HF's F.softmax(..., dtype=float32).to(dtype).
    assert_equal(probs, F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype))
    assert (probs[..., :3] == 0).all()  # exp(finfo.min - max) underflows to exactly 0
    expected = torch.softmax(scores.double(), dim=-1)
    # Tolerance vs float64: fp32 exp and a sum of 20 terms (atol 1e-6 on probabilities <= 1); bf16 one ulp.
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (BF16_ULP, 1e-4)
    torch.testing.assert_close(probs.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_fp32_is_fp32_softmax(dtype):
    logits = rand(7, 12, dtype=dtype, scale=2.0)
    probs = ops.softmax_fp32(logits)
    assert_equal(probs, F.softmax(logits, dim=-1, dtype=torch.float32))  # tolerance 0.0: HF router's call
    # Tolerance vs float64 (input exact in fp32): fp32 exp and a 12-term sum, atol 1e-6.
    torch.testing.assert_close(probs.double(), torch.softmax(logits.double(), -1), rtol=1e-6, atol=1e-6)
    with lens_det.deterministic():
        det = ops.softmax_fp32(logits)
    assert det.dtype == torch.float32
    torch.testing.assert_close(det, probs, rtol=1e-6, atol=1e-6)  # another sum order, same bound


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_softmax_is_padding_and_batch_invariant(dtype):
    """Deterministic softmax over more than one KEY_BLOCK of keys: left pads (masked, key_pos -1) are exact zeros
    and the real keys' probabilities equal the unpadded row's (tolerance 0.0); a batch row alone equals it in the
    batch (0.0). Against the default: another summation order, fp32 atol 1e-6, bf16 one ulp."""
    n_real = ops.KEY_BLOCK + 20
    unpadded, pos0 = _masked_scores(dtype, pads=0, n_real=n_real)
    padded, pos5 = _masked_scores(dtype, pads=5, n_real=n_real)
    other, pos_other = _masked_scores(dtype, pads=5, n_real=n_real, seed=7)
    with lens_det.deterministic():
        alone = ops.softmax(unpadded, pos0)
        p = ops.softmax(padded, pos5)
        batch = ops.softmax(torch.cat([other, padded]), torch.cat([pos_other, pos5]))
    assert (p[..., :5] == 0).all()
    assert_equal(p[..., 5:], alone)
    assert_equal(batch[1:], p)
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (BF16_ULP, 1e-4)
    torch.testing.assert_close(p, ops.softmax(padded), rtol=rtol, atol=atol)


def test_deterministic_softmax_of_a_row_with_no_real_token_is_zero():
    """A batch row that is all padding attends to nothing: exact zeros, never NaN (ops.softmax docstring). The
    default mode keeps HF's behaviour: finfo.min everywhere gives the uniform distribution (tolerance 0.0)."""
    scores = torch.full((1, 1, 2, 4), torch.finfo(torch.float32).min)
    with lens_det.deterministic():
        assert_equal(ops.softmax(scores, torch.full((1, 4), -1)), torch.zeros_like(scores))
    assert_equal(ops.softmax(scores), torch.full_like(scores, 0.25))


def test_softmax_over_one_key_is_one():
    scores = rand(2, 3, 4, 1)
    assert_equal(ops.softmax(scores), torch.ones_like(scores))  # exp(0) / exp(0): exactly 1
    with lens_det.deterministic():
        assert_equal(ops.softmax(scores, torch.zeros(2, 1, dtype=torch.long)), torch.ones_like(scores))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attend_is_hf_matmul_and_bloom_bmm(dtype):
    _, _, v = _qkv(dtype)
    probs = ops.softmax(rand(2, 3, 5, 9, dtype=dtype, seed=4))
    out = ops.attend(probs, v)
    assert_equal(out, torch.matmul(probs, v))  # HF eager_attention_forward; tolerance 0.0
    b, h, n_q, n_k = probs.shape
    bloom = torch.bmm(probs.view(b * h, n_q, n_k), v.reshape(b * h, n_k, -1)).view(b, h, n_q, -1)
    assert_equal(out, bloom)  # BloomAttention: torch.bmm on [batch * heads]; tolerance 0.0
    expected = probs.double() @ v.double()
    # Tolerance vs float64: a convex combination of 9 values ~N(0, 1): fp32 atol 1e-6; bf16 one ulp (|out| < 3).
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (BF16_ULP, 3 * BF16_ULP)
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_attend_is_padding_and_batch_invariant(dtype):
    """Deterministic probs @ V over more than one KEY_BLOCK: a left-padded row (pads with probability 0 and any
    values) equals the unpadded row, and a row alone equals it in a batch (tolerance 0.0). Against the default:
    fp32 accumulation in another order, atol 1e-6; bf16: both round an fp32 sum once, one ulp (|out| < 3)."""
    n_real, pads = ops.KEY_BLOCK + 20, 5
    scores, _ = _masked_scores(dtype, pads=0, n_real=n_real)
    probs = ops.softmax(scores)
    v = rand(1, 2, n_real, 16, dtype=dtype, seed=5)
    padded_probs = torch.cat([torch.zeros(1, 2, 3, pads, dtype=dtype), probs], dim=-1)
    padded_v = torch.cat([rand(1, 2, pads, 16, dtype=dtype, seed=6, scale=100.0), v], dim=2)
    pos0 = torch.arange(n_real)[None]
    pos5 = torch.cat([torch.full((pads,), -1), torch.arange(n_real)])[None]
    default = ops.attend(probs, v)
    with lens_det.deterministic():
        alone = ops.attend(probs, v, pos0)
        assert_equal(ops.attend(padded_probs, padded_v, pos5), alone)
        batch_probs = torch.cat([padded_probs.flip(-2), padded_probs])
        batch = ops.attend(batch_probs, torch.cat([padded_v, padded_v]), torch.cat([pos5, pos5]))
        assert_equal(batch[1:], alone)
    rtol, atol = (1e-6, 1e-6) if dtype == torch.float32 else (BF16_ULP, 3 * BF16_ULP)
    torch.testing.assert_close(alone, default, rtol=rtol, atol=atol)
