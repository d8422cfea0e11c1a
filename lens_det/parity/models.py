"""Moved to lens_det.hf.random_models (seeded random HF models); this path re-exports it for the notebooks, the
README and existing code."""

from lens_det.hf.random_models import random_hf_model, random_hf_model_from_config

__all__ = ["random_hf_model", "random_hf_model_from_config"]
