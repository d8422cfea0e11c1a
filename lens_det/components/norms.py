"""LayerNorm (Bloom) and RMSNorm (Gemma) with TransformerLens hooks.

hook_scale is the divisor sqrt(var + eps) in fp32, shape [..., 1]; hook_normalized is the norm's output (after
weight and bias, in the model dtype), i.e. the tensor HF's norm module returns. The scale is computed only when
something listens to hook_scale, and an edit to it is applied; otherwise the HF-exact op runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from lens_det.components.hooks import HookPoint

from lens_det import ops
from lens_det.config import LensConfig


def listened(hook: HookPoint) -> bool:
    """Whether a forward hook is attached (so a value computed only for it is worth computing)."""
    return bool(hook._forward_hooks)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(dim))
        self.b = nn.Parameter(torch.zeros(dim))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if listened(self.hook_scale):
            scale = ops.norm_scale(x, self.eps, center=True)
            hooked = self.hook_scale(scale)
            if hooked is not scale:  # an edited scale is applied, TransformerLens-style
                xf = x.float()
                out = ((xf - xf.mean(-1, keepdim=True)) / hooked * self.w.float() + self.b.float()).to(x.dtype)
        if out is None:
            out = self.normalize(x)
        return self.hook_normalized(out)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The norm without its hooks (for inputs that are not the residual stream, e.g. per-head copies)."""
        return ops.layer_norm(x, self.w, self.b, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm in fp32: x / sqrt(mean(x^2) + eps) (via rsqrt or pow(., -0.5), `inv_sqrt`), times (1 + w) or w, or
    no weight at all (`weight=False`: Gemma 4's v_norm), one cast back at the end."""

    def __init__(self, dim: int, eps: float, unit_offset: bool, inv_sqrt: str = "rsqrt", weight: bool = True):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.inv_sqrt = inv_sqrt
        if weight:
            self.w = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        else:
            self.w = None
        self.hook_scale = HookPoint()  # [batch, pos, 1] (or [batch, pos, head_index, 1] for q/k/v norms)
        self.hook_normalized = HookPoint()  # same shape as the input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_sq = None
        if listened(self.hook_scale):  # the statistic is computed once, for the hook and the norm
            mean_sq = ops.mean_square(x)
            scale = (mean_sq + self.eps).sqrt()
            hooked = self.hook_scale(scale)
            if hooked is not scale:
                out = x.float() / hooked
                if self.w is not None:
                    out = out * (1.0 + self.w.float() if self.unit_offset else self.w.float())
                return self.hook_normalized(out.to(x.dtype))
        return self.hook_normalized(self.normalize(x, mean_sq))

    def normalize(self, x: torch.Tensor, mean_sq: torch.Tensor | None = None) -> torch.Tensor:
        """The norm without its hooks (for inputs that are not the residual stream, e.g. per-head copies)."""
        return ops.rms_norm(x, self.w, self.eps, self.unit_offset, mean_sq, self.inv_sqrt)


def make_norm(cfg: LensConfig, dim: int | None = None, weight: bool = True) -> nn.Module:
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "layernorm":
        return LayerNorm(dim, cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, cfg.rmsnorm_unit_offset, cfg.rmsnorm_inv_sqrt, weight)


def make_optional_norm(cfg: LensConfig, present: bool, dim: int | None = None, weight: bool = True) -> nn.Module:
    """A norm when the config has it, an identity (with no hooks) when it does not."""
    return make_norm(cfg, dim, weight) if present else nn.Identity()
