"""Per-hook comparison of a lens_det model against its HF reference."""

from __future__ import annotations

from typing import Any

import torch

from lens_det.parity.reference import capture_reference


def hook_diffs(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |ours - reference| per hook present in both (float64 differences; inf on a shape mismatch)."""
    diffs = {}
    for name, ref in reference.items():
        if name not in ours:
            continue
        mine = ours[name]
        if mine.shape != ref.shape:
            diffs[name] = float("inf")
            continue
        diffs[name] = (mine.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    return diffs


def compare_hooks(
    model: Any,
    hf_model: Any,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[dict[str, float], list[str]]:
    """One uncached forward of both: ({hook or "logits": max |diff|}, hooks of `model` with no reference)."""
    with torch.no_grad():
        logits, ours = model.run_with_cache(tokens, attention_mask=attention_mask, position_ids=position_ids)
    ref_logits, reference = capture_reference(
        hf_model, model.config, tokens, attention_mask, position_ids,
        with_result=model.blocks[0].attn.use_attn_result,
    )
    diffs = hook_diffs(dict(ours.items()), reference)
    diffs["logits"] = (logits.double() - ref_logits.double()).abs().max().item()
    missing = sorted(set(ours.keys()) - set(reference))
    return diffs, missing


def compare_cached(
    model: Any,
    hf_model: Any,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    prefill: int = 1,
    chunk: int = 1,
) -> list[dict[str, float]]:
    """Run both with their KV caches on the same schedule (prefill, then chunks of `chunk` tokens) and return,
    per step, {hook or "logits": max |diff|} over the new positions."""
    from transformers import DynamicCache

    n = tokens.shape[1]
    if not 1 <= prefill <= n or chunk < 1:
        raise ValueError(f"need 1 <= prefill <= {n} tokens and chunk >= 1, got prefill={prefill}, chunk={chunk}")
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    hf_cache, cache = DynamicCache(config=hf_model.config), model.new_cache()
    bounds = [0, prefill, *range(prefill + chunk, n, chunk), n]
    steps = []
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        pos = None if position_ids is None else position_ids[:, a:b]
        with torch.no_grad():
            logits, ours = model.run_with_cache(tokens[:, a:b], attention_mask=mask[:, :b], position_ids=pos,
                                                kv_cache=cache)
        ref_logits, reference = capture_reference(hf_model, model.config, tokens[:, a:b], mask[:, :b], pos,
                                                  past_key_values=hf_cache)
        diffs = hook_diffs(dict(ours.items()), reference)
        diffs["logits"] = (logits.double() - ref_logits.double()).abs().max().item()
        steps.append(diffs)
    return steps
