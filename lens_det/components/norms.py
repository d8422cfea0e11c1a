"""LayerNorm (Bloom) and RMSNorm (Gemma) with TransformerLens hooks.

hook_scale is the divisor sqrt(var + eps) in fp32, shape [..., 1]; hook_normalized is the norm's output (after
weight and bias, in the model dtype), i.e. the tensor HF's norm module returns.

With no forward or backward hook on hook_scale the norm runs HF's op and nothing else. With one, the output is
still HF's op, bit for bit, and it also depends on the hooked scale the way TransformerLens's x_c / scale * w + b
does (x_c: x, centred for LayerNorm; w: w, 1 + w or none):

    out = hf(x) + u * (1 / hooked - 1 / scale)        u = x_c * w, detached

`scale` is the divisor computed from x (apart from HF's op, whose backward must stay HF's), `hooked` what
hook_scale returned for a copy of it (a copy, so that an in-place edit in a hook is seen as an edit). Where `hooked`
equals `scale` the bracket is exactly 0, so the forward is HF's whatever is attached: a hook that reads, returns
None, a clone or `scale.detach()`, or a backward hook (which hands the forward a new tensor object). Gradients,
with g the gradient at the output:
  * `hooked` gets TransformerLens's dL/d scale, -sum(g * u) / scale^2, so `retain_grad()` and backward hooks on
    hook_scale see it;
  * `scale` gets the same bits negated. When hooked's gradient flows back to `scale` unchanged the two cancel
    exactly, and x and the weights get HF's own backward of hf(x), bit for bit;
  * when a backward hook replaces that gradient, or a forward hook cuts it (`scale.detach()`, TransformerLens's
    freeze-the-norm idiom), `scale` keeps the difference and x gets HF's gradient plus (new - TL's gradient) times
    d scale / dx: TransformerLens's gradient for that edit, to rounding.
Positions where a hook changed the value (scale * 2, a patch) take TransformerLens's formula with the edited
divisor, x_c / hooked * w + b with x and w attached, so their value and gradients are TransformerLens's; every
other position keeps HF's bits. The bracket is built only when something can differentiate through it (grad mode
and a tensor that requires grad), the formula only when a value was edited.

Why this design: testing `hooked is scale` cannot tell an edit from the new tensor object of a backward hook or a
clone; torch.where(hooked == scale, hf(x), x_c / hooked * w + b) alone keeps the forward but gives hook_scale a
zero gradient and makes `scale.detach()` stop nothing; computing TransformerLens's formula whenever hook_scale is
hooked changes the forward (3.7e-5 in fp32) and every gradient; a torch.autograd.Function could route the same
gradients, but with a hand-written backward per norm variant where autograd differentiates these plain ops.
"""

from __future__ import annotations

import torch
from torch import nn
from lens_det.hooks import HookPoint, is_hooked

from lens_det import ops
from lens_det.config import LensConfig


def through_hooked_scale(exact: torch.Tensor, x: torch.Tensor, center: bool, gain: torch.Tensor | None,
                         bias: torch.Tensor | None, scale: torch.Tensor, hooked: torch.Tensor) -> torch.Tensor:
    """`exact` (HF's output for `x`) made to depend on `hooked` as x_c / hooked * gain + bias does: equal to `exact`
    where hooked == scale, that formula where a hook edited the scale (module docstring). gain and bias in fp32."""
    linked = hooked.requires_grad or scale.requires_grad  # something can differentiate through the scale
    same = hooked == scale
    edited = not bool(same.all())
    if not (linked or edited):
        return exact
    xf = x.float()
    x_c = xf - xf.mean(-1, keepdim=True) if center else xf
    if linked:
        u = (x_c if gain is None else x_c * gain).detach()
        exact = exact + (u * (hooked.reciprocal() - scale.reciprocal())).to(exact.dtype)
    if edited:
        tl = x_c / hooked if gain is None else x_c / hooked * gain
        exact = torch.where(same, exact, (tl if bias is None else tl + bias).to(exact.dtype))
    return exact


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(dim))
        self.b = nn.Parameter(torch.zeros(dim))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize(x)
        if is_hooked(self.hook_scale):
            scale = ops.norm_scale(x, self.eps, center=True)
            hooked = self.hook_scale(scale.clone())
            out = through_hooked_scale(out, x, True, self.w.float(), self.b.float(), scale, hooked)
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
        out = self.normalize(x)
        if is_hooked(self.hook_scale):
            # the scale is computed apart from HF's op: sharing its x.float() or mean would change HF's backward
            scale = (ops.mean_square(x) + self.eps).sqrt()
            hooked = self.hook_scale(scale.clone())
            out = through_hooked_scale(out, x, False, self.gain(), None, scale, hooked)
        return self.hook_normalized(out)

    def gain(self) -> torch.Tensor | None:
        """What the normalised x is multiplied by, in fp32: 1 + w, w, or nothing (None)."""
        if self.w is None:
            return None
        return 1.0 + self.w.float() if self.unit_offset else self.w.float()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The norm without its hooks (for inputs that are not the residual stream, e.g. per-head copies)."""
        return ops.rms_norm(x, self.w, self.eps, self.unit_offset, inv_sqrt=self.inv_sqrt)


def make_norm(cfg: LensConfig, dim: int | None = None, weight: bool = True) -> nn.Module:
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "layernorm":
        return LayerNorm(dim, cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, cfg.rmsnorm_unit_offset, cfg.rmsnorm_inv_sqrt, weight)


def make_optional_norm(cfg: LensConfig, present: bool, dim: int | None = None, weight: bool = True) -> nn.Module:
    """A norm when the config has it, an identity (with no hooks) when it does not."""
    return make_norm(cfg, dim, weight) if present else nn.Identity()
