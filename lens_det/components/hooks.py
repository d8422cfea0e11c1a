"""TransformerLens's HookPoint, with one check: a hook's edit must keep the shape, dtype and device it was given.
Another edit would otherwise fail later inside torch (or broadcast or promote silently) far from the hook that
caused it."""

from __future__ import annotations

import torch
from transformer_lens.hook_points import HookPoint as _HookPoint


QUERY_KEY_HOOKS = ("hook_pattern", "hook_attn_scores")  # [batch, head_index, query_pos, key_pos]


def position_dim(name: str) -> int:
    """The position axis of a hook's activation in its batched layout: every lens_det hook is [batch, pos, ...]
    except attention scores and patterns (their query axis)."""
    return 2 if name.endswith(QUERY_KEY_HOOKS) else 1


def is_hooked(hook: _HookPoint) -> bool:
    """Whether a forward or backward hook is attached (TransformerLens adds a backward hook as the module's full
    backward hook), so that a value computed only for hooks is worth computing and must be on the graph."""
    return bool(hook._forward_hooks or hook._backward_hooks)


class HookPoint(_HookPoint):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # An edit of another dtype or device is refused, not cast: a silent cast would hide that an fp32 edit (an
        # SAE reconstruction) is rounded to the model's bf16, or that a bf16 edit dropped bits of an fp32
        # activation (hook_scale); TransformerLens casts nothing either. The message names the one-line fix.
        out = super().__call__(x)
        if out is x:
            return out
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"a hook on {self.name} returned {got}; a hook must return None or a tensor of the "
                             f"shape it was given, {tuple(x.shape)}")
        if out.device != x.device:
            raise ValueError(f"a hook on {self.name} returned a tensor on {out.device}, but it was given one on "
                             f"{x.device}: move the edit back, `return edited.to(tensor.device)`")
        if out.dtype != x.dtype:
            raise ValueError(f"a hook on {self.name} returned a {out.dtype} tensor, but it was given {x.dtype} (what "
                             f"the model computes in there): cast the edit back, `return edited.to(tensor.dtype)`")
        return out
