"""Activation patching: put a clean run's activation into a corrupted run at any hook, position or head (or
query/key position of a pattern), sweep layers x positions or layers x heads, and patch during generation so
the effect persists through the KV cache. `transformer_lens.patching` works on lens_det models as well.

Positions are absolute (padded) indices: with a KV cache, a hook fired on a decode step sees only the new
positions, and the hooks made here translate (`model.query_start` is the index of the call's first token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from lens_det.components.hooks import QUERY_KEY_HOOKS

Metric = Callable[[torch.Tensor], torch.Tensor]


# --- metrics ---
def logit_diff(correct: int | Sequence[int], incorrect: int | Sequence[int], position: int = -1) -> Metric:
    """Metric: mean over the batch of logit[correct] - logit[incorrect] at `position` (per-row ids allowed)."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, position].float()
        rows = torch.arange(last.shape[0], device=last.device)
        good = torch.as_tensor(correct, device=last.device).expand(last.shape[0])
        bad = torch.as_tensor(incorrect, device=last.device).expand(last.shape[0])
        return (last[rows, good] - last[rows, bad]).mean()
    return metric


def token_prob(token: int | Sequence[int], position: int = -1) -> Metric:
    """Metric: mean over the batch of the softmax probability of `token` at `position`."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        probs = logits[:, position].float().softmax(-1)
        rows = torch.arange(probs.shape[0], device=probs.device)
        return probs[rows, torch.as_tensor(token, device=probs.device).expand(probs.shape[0])].mean()
    return metric


# --- patching hooks ---
def patch_hook(model: Any, clean: torch.Tensor, position: int | Sequence[int] | None = None,
               head: int | Sequence[int] | None = None, key_position: int | Sequence[int] | None = None,
               hook_name: str | None = None):
    """A hook that writes `clean` (the clean run's value of this hook, over all positions) into the running
    activation at the given absolute positions / heads (all when None). For hook_pattern/hook_attn_scores,
    `position` selects query positions and `key_position` key positions.

    The hook refuses to run on an activation `clean` cannot be (another rank, or another size on any axis but
    positions); with `hook_name` (where `clean` came from, e.g. "blocks.3.attn.hook_pattern") it refuses to run on
    any other hook point, which also catches a same-shaped tensor of another layer."""
    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        keyed = hook.name.endswith(QUERY_KEY_HOOKS)
        pos_dim, head_dim = (2, 1) if keyed else (1, 2)
        _check_fits(clean, act, hook.name, hook_name, {pos_dim, 3} if keyed else {pos_dim})
        start, n = getattr(model, "query_start", 0), act.shape[pos_dim]
        total = clean.shape[pos_dim]  # negative positions count from the end of the clean run
        wanted = range(start, start + n) if position is None else [p % total for p in _as_list(position)]
        local = [p - start for p in wanted if start <= p < start + n]
        if not local:
            return act
        if head is not None and act.ndim < 4:
            raise ValueError(f"{hook.name} has no head dimension; patch it by position only")
        index: list[Any] = [slice(None)] * act.ndim
        source: list[Any] = [slice(None)] * act.ndim
        index[pos_dim], source[pos_dim] = local, [p + start for p in local]
        if head is not None:
            index[head_dim] = source[head_dim] = _as_list(head)
        if keyed:  # this call attends to the last act.shape[3] keys of [0, start + n)
            key_offset = start + n - act.shape[3]
            keys = range(key_offset, start + n) if key_position is None else \
                [k % (start + n) for k in _as_list(key_position) if -(start + n) <= k < start + n]
            keys = [k for k in keys if k >= key_offset]  # keys outside this call's window are not attended
            if not keys:
                return act
            index[3] = [k - key_offset for k in keys]
            source[3] = list(keys)
        out = act.clone()
        out[_expand(index)] = clean.to(act.device, act.dtype)[_expand(source)]
        return out
    return hook


def _check_fits(clean: torch.Tensor, act: torch.Tensor, name: str, source: str | None, position_dims) -> None:
    if source is not None and source != name:
        raise ValueError(f"this patch hook carries {source} but was attached to {name}; attach it to {source}")
    other = [d for d in range(act.ndim) if d not in position_dims]
    if clean.ndim != act.ndim or any(clean.shape[d] != act.shape[d] for d in other):
        raise ValueError(f"the clean tensor {tuple(clean.shape)} does not fit {name} {tuple(act.shape)} (only "
                         "position axes may differ); pass the clean run's value of this same hook point")


def _as_list(value) -> list[int]:
    return [value] if isinstance(value, int) else list(value)


def _expand(index: list) -> tuple:
    """Turn per-dimension lists into broadcastable index tensors (outer product), keeping slices."""
    lists = [i for i, v in enumerate(index) if isinstance(v, list)]
    out = []
    for i, v in enumerate(index):
        if isinstance(v, list):
            shape = [1] * len(lists)
            shape[lists.index(i)] = len(v)
            out.append(torch.tensor(v).view(shape))
        else:
            out.append(v)
    return tuple(out)


def run_patched(model: Any, tokens: torch.Tensor, patches: Sequence[tuple[str, Callable]], **forward_kwargs):
    """Forward with the given (hook name, hook fn) pairs; returns logits."""
    with torch.no_grad(), model.hooks(fwd_hooks=list(patches)):
        return model(tokens, **forward_kwargs)


# --- sweeps ---
@dataclass
class PatchingResult:
    """Metric after each patch, normalised so 0 = corrupted run and 1 = clean run (raw values in `raw`)."""

    values: Float[torch.Tensor, "layer index"]
    raw: Float[torch.Tensor, "layer index"]
    index_name: str  # "pos" or "head"
    hook: str
    clean_metric: float
    corrupted_metric: float

    def to_frame(self):
        """A tidy pandas table: layer, pos/head, value, raw."""
        import pandas as pd

        layers, index = torch.meshgrid(torch.arange(self.values.shape[0]), torch.arange(self.values.shape[1]),
                                       indexing="ij")
        return pd.DataFrame({"layer": layers.flatten().numpy(), self.index_name: index.flatten().numpy(),
                             "value": self.values.flatten().numpy(), "raw": self.raw.flatten().numpy()})

    def plot(self, path=None, labels: Sequence[str] | None = None, title: str | None = None):
        """Heatmap of the normalised metric, layer x pos (or head)."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.5 + 0.5 * self.values.shape[1], 1.2 + 0.4 * self.values.shape[0]))
        image = ax.imshow(self.values.numpy(), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        ax.set_xlabel(self.index_name)
        ax.set_ylabel("layer")
        if labels is not None:
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=60, fontsize=7)
        ax.set_title(title or f"patching {self.hook} (1 = clean, 0 = corrupted)", fontsize=9)
        fig.colorbar(image, ax=ax)
        if path is not None:
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
        return fig


def patch_sweep(model: Any, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, metric: Metric,
                hook: str = "resid_pre", by: str = "pos", attention_mask: torch.Tensor | None = None,
                position_ids: Any = "mask") -> PatchingResult:
    """Patch the clean value of `blocks.{layer}.{hook}` (TransformerLens short names: resid_pre, resid_mid,
    resid_post, attn_out, mlp_out, or attn.hook_z / attn.hook_v ... for heads) into the corrupted run, one
    layer x position (by="pos") or layer x head (by="head", all positions) at a time. Where layers have different
    head counts (Gemma 4's full-attention layers), the heads a layer lacks are NaN."""
    full = hook if "." in hook or hook.startswith("hook_") else f"hook_{hook}"
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean and corrupted tokens must have the same shape, got {tuple(clean_tokens.shape)} "
                         f"and {tuple(corrupted_tokens.shape)}")
    if by not in ("pos", "head"):
        raise ValueError(f"by must be 'pos' or 'head', got {by!r}")
    kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda n: n.endswith(full),
                                                         **kwargs)
        corrupted_logits = model(corrupted_tokens, **kwargs)
    clean_value, corrupted_value = metric(clean_logits).item(), metric(corrupted_logits).item()
    n_layers = model.cfg.n_layers
    first = clean_cache.cache_dict.get(f"blocks.0.{full}")
    if first is None:
        raise ValueError(f"blocks.0.{full} is not a hook point of this model (hook={hook!r})")
    if by == "head" and first.ndim < 4:
        raise ValueError(f"{full} has no head dimension; use by='pos'")
    keyed = full.endswith(QUERY_KEY_HOOKS)

    def size(layer: int) -> int:  # positions, or the layer's heads (kv heads for hook_k/v; per layer on Gemma 4)
        value = clean_cache[f"blocks.{layer}.{full}"]
        return clean_tokens.shape[1] if by == "pos" else value.shape[1 if keyed else 2]

    sizes = [size(layer) for layer in range(n_layers)]
    raw = torch.full((n_layers, max(sizes)), float("nan"))  # NaN: a head this layer does not have
    for layer in range(n_layers):
        name = f"blocks.{layer}.{full}"
        for i in range(sizes[layer]):
            fn = patch_hook(model, clean_cache[name], hook_name=name, position=i if by == "pos" else None,
                            head=i if by == "head" else None)
            raw[layer, i] = metric(run_patched(model, corrupted_tokens, [(name, fn)], **kwargs)).item()
    span = clean_value - corrupted_value
    values = (raw - corrupted_value) / span if span else torch.zeros_like(raw)
    return PatchingResult(values, raw, by, full, clean_value, corrupted_value)


# --- generation ---
def generate_with_patches(model: Any, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          patches: dict[int, Sequence[tuple[str, Callable]]] | None = None, **generate_kwargs):
    """`model.generate` with hooks active only at chosen steps: {step: [(hook name, fn)]}, step 0 being the
    prompt's forward and step t the forward that produces generated token t. With the KV cache, an edit of
    hook_k / hook_v (or anything upstream of them) is stored and persists into every later step."""
    return model.generate(tokens, attention_mask, step_hooks=patches or {}, **generate_kwargs)
