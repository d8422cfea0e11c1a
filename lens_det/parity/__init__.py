"""Parity with Hugging Face: reference capture and per-hook comparison."""

from lens_det.parity.compare import compare_cached, compare_hooks, hook_diffs
from lens_det.parity.reference import SOURCES, capture_reference

__all__ = ["SOURCES", "capture_reference", "compare_cached", "compare_hooks", "hook_diffs"]
