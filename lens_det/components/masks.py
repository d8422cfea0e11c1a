"""Additive attention masks, exactly as HF eager builds them (docs/numerics.md §1.2, §1.3)."""

from __future__ import annotations

import torch


def additive_mask(
    mask: torch.Tensor, query_start: int, n_query: int, key_start: int, n_key: int, window: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Float mask [B, 1, q, K]: 0.0 where allowed, finfo(dtype).min elsewhere (never -inf: an all -inf pad row
    would be NaN and spread through 0 * NaN, docs/numerics.md §1.3).

    Query row r is absolute (padded) index query_start + r, key column c is absolute index key_start + c.
    allowed = (j <= i) and, for sliding layers, (j > i - window), and mask[b, j].
    """
    device = mask.device
    i = torch.arange(query_start, query_start + n_query, device=device)[:, None]
    j = torch.arange(key_start, key_start + n_key, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j > i - window)
    allowed = allowed[None, None] & mask[:, None, None, key_start : key_start + n_key].bool()
    return torch.where(allowed, torch.zeros((), device=device, dtype=dtype), torch.finfo(dtype).min)
