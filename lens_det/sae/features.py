"""Feature workflows on a spliced SAE: activations, top-activating positions, steering, attribution.

Every function attaches the SAE for its call (with the error term, so the model computes what it computes without
the SAE unless a feature is edited) and detaches it after, leaving SAEs the model already had in place.

- `feature_acts(model, sae, tokens, ...)`: [batch, pos, d_sae] feature activations of one forward.
- `top_activations(model, sae, tokens, features, k, attention_mask=...)`: per feature, the k largest activations
  over the batch and their (row, position), pads left out.
- `steer(sae, feature, value, mode, positions)`: a (hook name, hook) pair for fwd_hooks / run_with_hooks or
  generate's step_hooks: "add" value to the feature, "clamp" it to value, or "ablate" it (set it to 0), at the given
  absolute positions (None: every position). With the error term on, the model's activation moves by exactly the
  decoded change of that feature.
- `feature_attribution(model, sae, tokens, metric, ...)`: d metric(logits) / d feature activation, [batch, pos,
  d_sae] (the gradient flows through the error term and the rest of the model).
- `attribution_patching(model, sae, clean, corrupt, metric, ...)`: TransformerLens-style linear attribution of each
  feature at each position: (clean acts - corrupt acts) * d metric / d acts at the corrupt run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lens_det.sae.sae import SAE

STEER_MODES = ("add", "clamp", "ablate")


def _acts_name(sae: SAE) -> str:
    return f"{sae.cfg.hook_name}.hook_sae_acts_post"


def feature_acts(model, sae: SAE, tokens, attention_mask=None, **forward_kwargs) -> torch.Tensor:
    """Feature activations [batch, pos, d_sae] of one forward with the SAE spliced in (error term on)."""
    name = _acts_name(sae)
    with model.saes([sae], use_error_term=True):
        _, cache = model.run_with_cache(tokens, attention_mask=attention_mask, names_filter=name,
                                        return_type=None, **forward_kwargs)
    return cache[name]


def top_activations(model, sae: SAE, tokens, features: Sequence[int], k: int = 10, attention_mask=None,
                    **forward_kwargs) -> dict[int, list[tuple[float, int, int]]]:
    """{feature: [(activation, row, position), ...]} with the k largest activations of each feature over the batch,
    largest first (ties: the earlier row, then the earlier position); pad positions (mask 0) are left out."""
    acts = feature_acts(model, sae, tokens, attention_mask, **forward_kwargs).float()
    if attention_mask is not None:
        acts = acts.masked_fill(~attention_mask.to(acts.device, torch.bool)[..., None], float("-inf"))
    out = {}
    for feature in features:
        if not 0 <= feature < sae.cfg.d_sae:
            raise ValueError(f"feature {feature} is out of range for d_sae={sae.cfg.d_sae}")
        flat = acts[..., feature].flatten()
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        width = acts.shape[1]
        out[feature] = [(float(flat[i]), int(i) // width, int(i) % width) for i in order if flat[i] > float("-inf")]
    return out


def steer(sae: SAE, feature: int | Sequence[int], value: float = 0.0, mode: str = "add",
          positions: Sequence[int] | None = None, model=None) -> tuple[str, Callable]:
    """A hook on the SAE's hook_sae_acts_post that edits `feature` ("add" value, "clamp" to value, "ablate") at the
    absolute `positions` (None: all). Pass `model` when positions are given so the hook reads which absolute
    positions the running forward holds (model.query_start: with a KV cache, a decode step holds one)."""
    if mode not in STEER_MODES:
        raise ValueError(f"mode must be one of {STEER_MODES}, got {mode!r}")
    features = [feature] if isinstance(feature, int) else list(feature)
    bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise ValueError(f"feature(s) {bad} out of range for d_sae={sae.cfg.d_sae}")
    if positions is not None and model is None:
        raise ValueError("steer(..., positions=...) needs model= to map absolute positions onto each forward's")

    def hook(acts: torch.Tensor, hook) -> torch.Tensor:
        acts = acts.clone()
        if positions is None:
            index = (..., features)
        else:
            start = model.query_start
            local = [p - start for p in positions if start <= p < start + acts.shape[1]]
            if not local:
                return acts
            index = (slice(None), torch.tensor(local)[:, None], torch.tensor(features)[None, :])
        if mode == "add":
            acts[index] = acts[index] + value
        else:
            acts[index] = value if mode == "clamp" else 0.0
        return acts

    return _acts_name(sae), hook


def feature_attribution(model, sae: SAE, tokens, metric: Callable[[torch.Tensor], torch.Tensor],
                        attention_mask=None, **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature activations, d metric(logits) / d feature activations), both [batch, pos, d_sae] in the SAE's dtype,
    from one forward and backward with the SAE spliced in (error term on, so the forward is the model's own)."""
    name = _acts_name(sae)
    saved: dict[str, torch.Tensor] = {}

    def keep(acts, hook):  # the activations as a leaf the rest of the forward reads (works with frozen weights)
        leaf = acts.detach().requires_grad_(True)
        saved["acts"] = leaf
        return leaf

    with torch.enable_grad(), model.saes([sae], use_error_term=True):
        logits = model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=[(name, keep)],
                                      **forward_kwargs)
        value = metric(logits)
        if value.numel() != 1:
            raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
        acts = saved["acts"]
        (grad,) = torch.autograd.grad(value, acts)
    return acts.detach(), grad


def attribution_patching(model, sae: SAE, clean_tokens, corrupt_tokens, metric: Callable[[torch.Tensor], torch.Tensor],
                         attention_mask=None, **forward_kwargs) -> torch.Tensor:
    """Attribution of every feature at every position, [batch, pos, d_sae]: (clean acts - corrupt acts) times the
    gradient of metric at the corrupt run (the linear estimate of patching that feature from clean into corrupt)."""
    clean = feature_acts(model, sae, clean_tokens, attention_mask, **forward_kwargs)
    corrupt, grad = feature_attribution(model, sae, corrupt_tokens, metric, attention_mask, **forward_kwargs)
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean and corrupt runs must have the same shape, got {tuple(clean.shape)} and "
                         f"{tuple(corrupt.shape)}")
    return (clean - corrupt) * grad
