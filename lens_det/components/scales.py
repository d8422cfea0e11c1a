"""The modules that multiply by a scalar the HF way: Gemma 2's soft-caps (attention scores and final logits) and
Gemma's embedding scale sqrt(d)."""

from __future__ import annotations

import torch
from torch import nn

from lens_det import ops


class SoftCap(nn.Module):
    """tanh(s / cap) * cap, in that op order (docs/numerics.md §4)."""

    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return ops.tanh(s / self.cap) * self.cap


class EmbedScale(nn.Module):
    """x * sqrt(d_model), the scale cast to x's dtype first and multiplied in that dtype (docs/numerics.md §3.2)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.scale = torch.tensor(d_model**0.5, dtype=torch.float32, device="cpu")  # HF's float32 buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(device=x.device, dtype=x.dtype)
