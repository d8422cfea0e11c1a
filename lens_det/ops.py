"""Every reduction the models do: linear layers, norms, attention scores, softmax and the attention-weighted sum.

The default implementations reproduce Hugging Face eager bit for bit (REFERENCE.md names the section for each
operation order). Keeping them here, and nowhere else, is what lets a deterministic mode swap them in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` as `nn.Linear` computes it (weight in HF layout [out, in])."""
    return F.linear(x, weight, bias)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm on the dt tensor with dt weights, no manual upcast (REFERENCE §2.2)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> torch.Tensor:
    """fp32 normalise, times (1 + w) or w in fp32, one cast at the end (REFERENCE §3.3)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    scale = 1.0 + weight.float() if unit_offset else weight.float()
    return (y * scale).type_as(x)


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
    (REFERENCE §2.4: separate ops differ in bf16). Without, `(Q @ K^T) * scale` (REFERENCE §1.6).
    """
    if bias is None:
        return torch.matmul(q, k.transpose(2, 3)) * scale
    b, h, n_q, d = q.shape
    scores = bias.baddbmm(
        q.reshape(b * h, n_q, d), k.reshape(b * h, -1, d).transpose(-1, -2), beta=1.0, alpha=scale
    )
    return scores.view(b, h, n_q, -1)


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over keys in fp32, cast back to the scores' dtype (REFERENCE §1.6)."""
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs [B, H, q, K] @ v [B, H, K, d] -> [B, H, q, d]."""
    return torch.matmul(probs, v)
