"""Every reduction and every non-arithmetic elementwise op the models do: linear layers, norms, attention scores,
softmax, the attention-weighted sum, and the transcendental functions (tanh, exp, cos/sin, rsqrt, and the MLP
activations by LensConfig.act_fn name, ACTIVATIONS: Bloom's GELU and the tanh and erf GELUs).

The default implementations reproduce Hugging Face eager bit for bit (each docstring names the op order that
matters). Keeping them here, and nowhere else, is what lets the deterministic mode swap them in one place.

Deterministic mode, `with lens_det.deterministic():`, makes a prompt's every activation independent of batch
composition, padding, prefill chunking, the KV cache and the thread count. Each rule below answers a measured
cause (torch 2.13.0 CPU build; docs/determinism.md has the figures):
  * GEMMs: a BLAS picks its kernel, blocking and thread split from the call's shape, so a row's bits depend on
    the other rows. MKL's strict reproducibility mode (lens_det.blas, set at import) removes this; rows are
    also padded to a multiple of ROW_TILE so no call takes the matrix-vector path, and a GEMM with few output
    columns runs on fewer threads (lens_det.blas.gemm_threads: MKL splits those by thread count even so).
    bfloat16/float16 GEMMs run in float32 (their oneDNN kernels are outside MKL's mode) and round once.
  * Sums over keys (softmax denominator, probs @ V) run over fixed KEY_BLOCK blocks aligned on each key's
    real-token index, in float32, added block after block; masked keys are exact zeros. Attention scores are
    computed one KEY_BLOCK of keys at a time. A prompt alone, padded, chunked or decoded reduces the same
    numbers in the same order.
  * Elementwise ops: ATen runs a SIMD body over whole vectors and another path for the remainder (the end of
    the tensor and of each thread's chunk). Add, multiply, divide, sqrt and casts are correctly rounded on both
    paths; tanh, exp, erf, GELU, sigmoid, cos, sin and rsqrt are not (1e-8 to 2e-7 apart). `pointwise` runs those
    on a layout where every element takes the SIMD body: the flat tensor padded to VECTOR_BLOCK elements and
    cut into SERIAL_PIECE pieces (each below ATen's parallel grain, so one thread runs it whole).
  * Row reductions (mean over the last dim, layer_norm) reduce each row alone in an order fixed by its width.
The op-level audit (lens_det.determinism.audit) checks each of these claims bitwise on the running machine,
for every op listed in AUDITED_OPS, across thread counts and CPU capability levels.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn.functional as F

from lens_det.blas import gemm_threads, require_reproducible_blas

ROW_TILE = 8
KEY_BLOCK = 64
VECTOR_BLOCK = 64  # elements: whole SIMD vectors for every dtype and ISA (bfloat16 on AVX-512: 2 x 32 lanes)
SERIAL_PIECE = 16384  # elements per call: under ATen's 32768-element grain, so no thread boundary inside
_DETERMINISTIC = contextvars.ContextVar("lens_det_deterministic", default=False)


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """Run the models with batch-invariant ops inside this block (see the module docstring). Raises when the
    BLAS is MKL without its strict reproducibility mode (see lens_det.blas)."""
    if enabled:
        require_reproducible_blas()
    token = _DETERMINISTIC.set(enabled)
    try:
        yield
    finally:
        _DETERMINISTIC.reset(token)


def is_deterministic() -> bool:
    return _DETERMINISTIC.get()


def _pad(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def pointwise(fn, x: torch.Tensor) -> torch.Tensor:
    """`fn(x)` for an elementwise `fn`; in deterministic mode on a layout where every element takes the same
    (SIMD) code path whatever the tensor's size and the thread count (module docstring)."""
    if not _DETERMINISTIC.get():
        return fn(x)
    flat = x.reshape(-1)
    pieces = _pad(flat, 0, VECTOR_BLOCK).split(SERIAL_PIECE)
    out = fn(pieces[0]) if len(pieces) == 1 else torch.cat([fn(p) for p in pieces])
    return out[: flat.numel()].view(x.shape)


def tanh(x: torch.Tensor) -> torch.Tensor:
    return pointwise(torch.tanh, x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return pointwise(functools.partial(F.gelu, approximate="tanh"), x)


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return pointwise(F.gelu, x)


class _BloomGelu(torch.autograd.Function):
    """HF's BloomGelu (GeLUFunction): the forward expression below, and HF's own backward formula (bloom_gelu_back)
    rather than autograd's derivative of the forward, so that gradients equal HF's bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        tanh_out = tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        # 0.1070322243 = sqrt(2 / pi) * 3 * 0.044715, as HF writes it
        ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
        return ff * grad


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """Bloom's tanh GELU with the truncated constant and this exact expression order (docs/numerics.md §2.5), with
    HF's backward."""
    return _BloomGelu.apply(x)


ACTIVATIONS = {"bloom_gelu": bloom_gelu, "gelu_tanh": gelu_tanh, "gelu_erf": gelu_erf}  # by LensConfig.act_fn


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` as `nn.Linear` computes it (weight in HF layout [out, in])."""
    if not _DETERMINISTIC.get():
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    w, b = weight.float(), None if bias is None else bias.float()
    with gemm_threads(w.shape[0]):  # few columns per thread: MKL splits the work by thread count (lens_det.blas)
        out = F.linear(_pad(rows.float(), 0, ROW_TILE), w, b)[: rows.shape[0]].to(x.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm on the dt tensor with dt weights, no manual upcast (docs/numerics.md §2.2)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """mean(x^2) over the last dim in fp32, [..., 1] (RMSNorm's statistic)."""
    return x.float().pow(2).mean(-1, keepdim=True)


def inv_sqrt_pow(x: torch.Tensor) -> torch.Tensor:
    """torch.pow(x, -0.5): Gemma 4's RMSNorm spelling of 1 / sqrt (HF chose pow over rsqrt on purpose;
    docs/numerics.md §6.1)."""
    return pointwise(lambda t: torch.pow(t, -0.5), x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, unit_offset: bool,
             inv_sqrt: str = "rsqrt") -> torch.Tensor:
    """fp32 normalise, times (1 + w) or w in fp32 (nothing when `weight` is None), one cast at the end
    (docs/numerics.md §3.3). `inv_sqrt` is "rsqrt" (Gemma 1-3: x * rsqrt(ms + eps)) or "pow" (Gemma 4:
    x * pow(ms + eps, -0.5)). Two steps, times_inv_sqrt then times_gain, so that a fault (lens_det.parity.faults)
    can replace one of them."""
    xf = x.float()
    return times_gain(times_inv_sqrt(xf, mean_square(xf) + eps, inv_sqrt), weight, unit_offset, x)


def times_inv_sqrt(xf: torch.Tensor, denominator: torch.Tensor, inv_sqrt: str) -> torch.Tensor:
    """rms_norm's normalisation, fp32: xf * rsqrt(denominator) or xf * pow(denominator, -0.5)."""
    return xf * (inv_sqrt_pow(denominator) if inv_sqrt == "pow" else pointwise(torch.rsqrt, denominator))


def times_gain(y: torch.Tensor, weight: torch.Tensor | None, unit_offset: bool, like: torch.Tensor) -> torch.Tensor:
    """rms_norm's gain: fp32 y times (1 + w) or w in fp32 (nothing when `weight` is None), then cast to like's type."""
    if weight is None:
        return y.type_as(like)
    scale = 1.0 + weight.float() if unit_offset else weight.float()
    return (y * scale).type_as(like)


def norm_scale(x: torch.Tensor, eps: float, center: bool) -> torch.Tensor:
    """The divisor a norm applies, sqrt(var + eps), in fp32 with shape [..., 1] (the hook_scale value)."""
    xf = x.float()
    if center:
        xf = xf - xf.mean(-1, keepdim=True)
    return (xf.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def attention_scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled scores [B, H, q, K] from q [B, H, q, d] and k [B, H, K, d].

    With a positional `bias` [B*H, 1, K] (ALiBi) this is Bloom's fused `baddbmm(bias, Q, K^T, alpha=scale)`
    (docs/numerics.md §2.4: separate ops differ in bf16). Without, `(Q @ K^T) * scale` (docs/numerics.md §1.6).
    """
    if _DETERMINISTIC.get():  # float32 GEMMs of one KEY_BLOCK of keys each, one rounding to the dtype
        n_q, n_k = q.shape[2], k.shape[2]
        qp, kp = _pad(q.float(), 2, ROW_TILE), _pad(k.float(), 2, KEY_BLOCK)
        blocks = [torch.matmul(qp, kp[:, :, s : s + KEY_BLOCK].transpose(2, 3))
                  for s in range(0, kp.shape[2], KEY_BLOCK)]
        scores = (torch.cat(blocks, dim=-1)[:, :, :n_q, :n_k] * scale).to(q.dtype)
        return scores if bias is None else scores + bias.view(q.shape[0], q.shape[1], 1, n_k)
    if bias is None:
        return torch.matmul(q, k.transpose(2, 3)) * scale
    b, h, n_q, d = q.shape
    scores = bias.baddbmm(
        q.reshape(b * h, n_q, d), k.reshape(b * h, -1, d).transpose(-1, -2), beta=1.0, alpha=scale
    )
    return scores.view(b, h, n_q, -1)


def softmax(scores: torch.Tensor, key_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over keys in fp32, cast back to the scores' dtype (docs/numerics.md §1.6). `key_pos` [B, K] (each key's
    real-token index, -1 for pads) is used by the deterministic mode only."""
    if not _DETERMINISTIC.get():
        return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    s = scores.float()
    e = pointwise(torch.exp, s - s.amax(dim=-1, keepdim=True))  # the max is exact whatever the order
    ones = e.new_ones(*e.shape[:2], e.shape[-1], 1)
    total = _blocked_matmul(e, ones, key_pos)
    # A batch row with no real token at all has nothing to attend to: attend to nothing (0), never NaN.
    return torch.where(total > 0, e / total, 0.0).to(scores.dtype)


def softmax_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim computed and returned in fp32 (`F.softmax(x, -1, dtype=torch.float32)`, Gemma 4's
    MoE router; docs/numerics.md §6.11). Deterministic mode: exp on the SIMD layout, each row summed alone."""
    if not _DETERMINISTIC.get():
        return F.softmax(logits, dim=-1, dtype=torch.float32)
    s = logits.float()
    e = pointwise(torch.exp, s - s.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def attend(probs: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor | None = None) -> torch.Tensor:
    """probs [B, H, q, K] @ v [B, H, K, d] -> [B, H, q, d]."""
    if not _DETERMINISTIC.get():
        return torch.matmul(probs, v)
    return _blocked_matmul(probs, v, key_pos).to(v.dtype)


def _blocked_matmul(p: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """p [B, H, q, K] @ v [B, H, K, n] in float32, summed over KEY_BLOCK blocks of keys aligned on key_pos."""
    n_q = p.shape[2]
    p_c, v_c = _compact(p.float(), v.float(), key_pos)
    p_c = _pad(p_c, 2, ROW_TILE)
    out = None
    for s in range(0, p_c.shape[-1], KEY_BLOCK):
        block = torch.matmul(p_c[..., s : s + KEY_BLOCK], v_c[:, :, s : s + KEY_BLOCK])
        out = block if out is None else out + block
    return out[:, :, :n_q]


def _compact(p: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor):
    """Move each key to slot (real index - base) of a zero tensor, base = the row's first real index rounded
    down to KEY_BLOCK, so blocks hold the same keys however the row was padded, chunked or trimmed."""
    real = key_pos >= 0
    first = torch.where(real, key_pos, key_pos.new_full((), 2**62)).amin(dim=-1, keepdim=True)
    base = torch.where(first < 2**62, first, 0) // KEY_BLOCK * KEY_BLOCK
    slot = key_pos - base
    width = -(-(int(slot.max()) + 1) // KEY_BLOCK) * KEY_BLOCK if bool(real.any()) else KEY_BLOCK
    slot = torch.where(real, slot, width)  # pads go to a dump column that is cut off
    b, h, n_q, _ = p.shape
    p_out = p.new_zeros(b, h, n_q, width + 1).scatter_(-1, slot[:, None, None, :].expand(b, h, n_q, -1), p)
    n = v.shape[-1]
    v_out = v.new_zeros(b, h, width + 1, n).scatter_(2, slot[:, None, :, None].expand(b, h, -1, n), v)
    return p_out[..., :width], v_out[:, :, :width]
