"""TransformerLens's HookPoint, with one check: a hook's edit must keep the shape it was given. A wrong-shaped
edit would otherwise fail later inside torch (or broadcast silently) far from the hook that caused it."""

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
        out = super().__call__(x)
        if out is not x and (not isinstance(out, torch.Tensor) or out.shape != x.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"a hook on {self.name} returned {got}; a hook must return None or a tensor of the "
                             f"shape it was given, {tuple(x.shape)}")
        return out
