"""Moved to lens_det.hf (config and state-dict conversion, the lens<->HF module tables, the attention-implementation
rules); this path re-exports it. `lens_det.convert.bloom` and `lens_det.convert.gemma` are the very modules
`lens_det.hf.bloom` and `lens_det.hf.gemma` (aliased in sys.modules), so patching either path patches both."""

import sys

from lens_det.hf import (ATTN_IMPLEMENTATIONS, FAMILIES, bloom, default_attn_implementation, family_for, gemma,
                         hf_attn_implementation, resolve_attn_implementation, sdpa_refusal)

sys.modules[__name__ + ".bloom"] = bloom
sys.modules[__name__ + ".gemma"] = gemma

__all__ = ["ATTN_IMPLEMENTATIONS", "FAMILIES", "bloom", "default_attn_implementation", "family_for", "gemma",
           "hf_attn_implementation", "resolve_attn_implementation", "sdpa_refusal"]
