"""Parity with Hugging Face: reference capture, per-hook comparison with the cache off and on, reports."""

from lens_det.parity.compare import assert_parity, compare, self_parity
from lens_det.parity.reference import SOURCES, capture_reference
from lens_det.parity.report import HookDiff, ParityReport, Schedule

__all__ = ["SOURCES", "HookDiff", "ParityReport", "Schedule", "assert_parity", "capture_reference", "compare",
           "self_parity"]
