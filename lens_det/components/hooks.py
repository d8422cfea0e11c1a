"""Moved to lens_det.hooks (with the registry of hook kinds); this path keeps working."""

from lens_det.hooks import QUERY_KEY_HOOKS, HookPoint, is_hooked, position_dim

__all__ = ["QUERY_KEY_HOOKS", "HookPoint", "is_hooked", "position_dim"]
