"""Moved to lens_det.tl.weight_processing (TransformerLens's weight processing); this path re-exports it."""

from lens_det.tl.weight_processing import (  # noqa: F401
    CHANGED_HOOKS, STEP_FUNCTIONS, STEPS, changed_hooks, process_weights_, why_not,
)
