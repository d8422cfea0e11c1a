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
