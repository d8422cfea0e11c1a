"""Positional mechanisms: ALiBi (Bloom) and RoPE (Gemma), both driven by the 2-D attention mask.

Positions come from the mask, never from pad-token ids.
"""

from __future__ import annotations

import math

import torch

from lens_det import ops


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Bloom's per-head slopes, float32 `pow` with the odd-power extension (docs/numerics.md §2.4). Built on the CPU
    (also under a meta-device context) and moved where needed."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32, device="cpu")
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32, device="cpu"))
    if closest != n_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32, device="cpu")
        n_extra = min(closest, n_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * n_extra, 2, dtype=torch.int32, device="cpu"))
        slopes = torch.cat([slopes, extra], dim=0)
    return slopes


def alibi_bias(mask: torch.Tensor, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi bias [B*H, 1, K] from the full mask [B, K]: slope_h * key position, positions counted over real
    tokens only (pads -> 0), float32 product cast to dtype (docs/numerics.md §2.4)."""
    batch, length = mask.shape
    key_pos = ((mask.cumsum(dim=-1) - 1) * mask)[:, None, :]
    bias = slopes.to(mask.device)[..., None] * key_pos
    return bias.reshape(batch * slopes.shape[0], 1, length).to(dtype)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """The position ids HF `generate` uses: cumsum(mask) - 1, pads at 0 (docs/numerics.md §1.4)."""
    mask = mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def rope_inv_freq(d_head: int, theta: float, linear_factor: float, rotary_fraction: float = 1.0) -> torch.Tensor:
    """float32 inverse frequencies [d_head // 2], divided by the linear scaling factor (docs/numerics.md §3.4, §5).

    With `rotary_fraction` < 1 (HF's "proportional" RoPE, Gemma 4 full layers): the first
    int(rotary_fraction * d_head // 2) frequencies, their exponents still over the full d_head, then zeros, so the
    remaining pairs get cos 1, sin 0 and pass unrotated (HF's `_compute_proportional_rope_parameters`,
    docs/numerics.md §6.4)."""
    n_rotated = int(rotary_fraction * d_head // 2)  # all d_head // 2 pairs at fraction 1
    exponents = torch.arange(0, 2 * n_rotated, 2, dtype=torch.int64, device="cpu").float() / d_head
    unrotated = torch.zeros(d_head // 2 - n_rotated, dtype=torch.float32, device="cpu")
    inv_freq = torch.cat([1.0 / (theta**exponents), unrotated])
    if linear_factor != 1.0:
        inv_freq /= linear_factor
    return inv_freq


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B or 1, q, d_head] in float32, then cast to dtype (docs/numerics.md §3.4)."""
    freqs = position_ids[..., None].float() * inv_freq.to(device=position_ids.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    return ops.pointwise(torch.cos, emb).to(dtype), ops.pointwise(torch.sin, emb).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("NeoX") rotation of x [B, H, q, d] with cos/sin [B, q, d] (docs/numerics.md §3.4)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)
