"""Activation patching: put a clean run's activation into a corrupted run at any hook, position or head (or
query/key position of a pattern), sweep layers x positions or layers x heads, and patch during generation so
the effect persists through the KV cache. `transformer_lens.patching` works on lens_det models as well.

Positions are absolute (padded) indices: with a KV cache, a hook fired on a decode step sees only the new
positions, and the hooks made here translate: `model.query_start` is the absolute index of the first position
the running hooks see (HookedDecoder's hook protocol; 0 on a model without it, e.g. TransformerLens's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from lens_det.hooks import hook_kind

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
        kind = hook_kind(hook.name)
        pos_dim, head_dim, key_dim = kind.pos_axis, kind.head_axis, kind.key_axis
        _check_fits(clean, act, hook.name, hook_name, set(kind.position_axes))
        start, n = getattr(model, "query_start", 0), act.shape[pos_dim]
        total = clean.shape[pos_dim]  # negative positions count from the end of the clean run
        wanted = range(start, start + n) if position is None else [p % total for p in _as_list(position)]
        local = [p - start for p in wanted if start <= p < start + n]
        if not local:
            return act
        if head is not None and head_dim is None:
            raise ValueError(f"{hook.name} has no head dimension; patch it by position only")
        index: list[Any] = [slice(None)] * act.ndim
        source: list[Any] = [slice(None)] * act.ndim
        index[pos_dim], source[pos_dim] = local, [p + start for p in local]
        if head is not None:
            index[head_dim] = source[head_dim] = _as_list(head)
        if key_dim is not None:  # this call attends to the last act.shape[key_dim] keys of [0, start + n)
            key_offset = start + n - act.shape[key_dim]
            keys = range(key_offset, start + n) if key_position is None else \
                [k % (start + n) for k in _as_list(key_position) if -(start + n) <= k < start + n]
            keys = [k for k in keys if k >= key_offset]  # keys outside this call's window are not attended
            if not keys:
                return act
            index[key_dim] = [k - key_offset for k in keys]
            source[key_dim] = list(keys)
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
    """Metric after each patch, normalised so 0 = corrupted run and 1 = clean run (raw values in `raw`).
    `clean_str_tokens` / `corrupted_str_tokens`: the two prompts' tokens as strings (one-row batches of a model
    with a tokenizer; None otherwise), which `plot` puts on the position axis."""

    values: Float[torch.Tensor, "layer index"]
    raw: Float[torch.Tensor, "layer index"]
    index_name: str  # "pos" or "head"
    hook: str
    clean_metric: float
    corrupted_metric: float
    clean_str_tokens: list[str] | None = None
    corrupted_str_tokens: list[str] | None = None

    def to_frame(self):
        """A tidy pandas table: layer, pos/head, value, raw."""
        import pandas as pd

        layers, index = torch.meshgrid(torch.arange(self.values.shape[0]), torch.arange(self.values.shape[1]),
                                       indexing="ij")
        return pd.DataFrame({"layer": layers.flatten().numpy(), self.index_name: index.flatten().numpy(),
                             "value": self.values.flatten().numpy(), "raw": self.raw.flatten().numpy()})

    def plot(self, path=None, labels: Sequence[str] | None = None, title: str | None = None):
        """Heatmap of the normalised metric, layer x position (or head). The colour range is symmetric and holds
        every value (at least -1..1), so nothing is clipped. By position, the x axis shows the clean prompt's tokens
        (or `labels`), bold where the corrupted prompt differs, with position indices on top. `title` replaces the
        first title line; the lines under it give the raw metric of both runs and the two prompts."""
        from textwrap import shorten

        import matplotlib
        import matplotlib.pyplot as plt
        import numpy as np

        values = self.values.numpy()
        n_layers, n_index = values.shape
        cell_w, cell_h = min(0.45, max(0.16, 8.5 / n_index)), min(0.45, max(0.16, 5.0 / n_layers))  # inches
        fig, ax = plt.subplots(figsize=(2.6 + cell_w * n_index, 2.0 + cell_h * n_layers), layout="constrained")
        limit = max(1.0, float(np.nanmax(np.abs(values), initial=0.0)))
        cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.8")
        image = ax.imshow(values, cmap=cmap, vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=8)
        ax.set_ylabel("layer")
        axis = "position" if self.index_name == "pos" else "head"
        tokens = labels if labels is not None else self.clean_str_tokens if self.index_name == "pos" else None
        if tokens is None:
            ax.set_xticks(range(0, n_index, 1 if n_index <= 20 else 5))
            ax.set_xlabel(axis)
        else:
            shown = [str(t).replace(" ", "\u2423").replace("\n", "\u21b5") for t in tokens]
            ax.set_xticks(range(n_index), shown, fontsize=8)
            for label in ax.get_xticklabels():
                label.set_rotation(90 if len(label.get_text()) > 2 else 0)  # long ones ("<bos>", words) vertical
            other = self.corrupted_str_tokens if labels is None else None
            differs = [] if other is None else [i for i, (a, b) in enumerate(zip(tokens, other)) if a != b]
            for i in differs:
                ax.get_xticklabels()[i].set(fontweight="bold", color="C3")
            ax.set_xlabel(axis if labels is not None else
                          "clean token" + (" (bold red: the corrupted prompt differs)" if differs else ""))
        if tokens is not None and self.index_name == "pos":
            top = ax.secondary_xaxis("top")
            step = 1 if n_index <= 20 else 5
            top.set_xticks(range(0, n_index, step), [str(i) for i in range(0, n_index, step)], fontsize=7)
            top.set_xlabel("position", fontsize=8)
        bar = fig.colorbar(image, ax=ax, shrink=0.9)
        bar.set_label("patched metric, normalised\n0 = corrupted run, 1 = clean run", fontsize=8)
        what = "position" if self.index_name == "pos" else "head (all positions)"
        lines = [title or f"clean {self.hook} patched into the corrupted run, one layer x {what} at a time",
                 f"metric: clean run {self.clean_metric:.4g}, corrupted run {self.corrupted_metric:.4g}"
                 + ("; equal, so every cell is 0" if self.clean_metric == self.corrupted_metric else
                    "; cell = (patched - corrupted) / (clean - corrupted)")]
        if self.clean_str_tokens and self.corrupted_str_tokens:
            clean, corrupted = ("".join(t) for t in (self.clean_str_tokens, self.corrupted_str_tokens))
            lines.append(f"clean: {shorten(clean, 70, placeholder=' …')!r}   "
                         f"corrupted: {shorten(corrupted, 70, placeholder=' …')!r}")
        if np.isnan(values).any():
            lines.append("grey: this layer has no such head or hook")
        ax.set_title("\n".join(lines), fontsize=9)
        if path is not None:
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
        return fig


def _str_tokens(model: Any, tokens: torch.Tensor) -> list[str] | None:
    """A one-row batch's tokens as strings, for the heatmap's position axis; None without a tokenizer."""
    if tokens.shape[0] != 1 or getattr(model, "tokenizer", None) is None:
        return None
    return list(model.to_str_tokens(tokens[0]))


def patch_sweep(model: Any, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, metric: Metric,
                hook: str = "resid_pre", by: str = "pos", attention_mask: torch.Tensor | None = None,
                position_ids: Any = "mask") -> PatchingResult:
    """Patch the clean value of `blocks.{layer}.{hook}` (TransformerLens short names: resid_pre, resid_mid,
    resid_post, attn_out, mlp_out, or attn.hook_z / attn.hook_v ... for heads) into the corrupted run, one
    layer x position (by="pos") or layer x head (by="head", all positions) at a time. Where layers have different
    head counts (Gemma 4's full-attention layers), the heads a layer lacks are NaN; so is every entry of a layer
    without the hook (Gemma 4's KV-sharing layers have no hook_k / hook_v: patch their source layer's)."""
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
    head_dim = hook_kind(f"blocks.0.{full}").head_axis
    if by == "head" and head_dim is None:
        raise ValueError(f"{full} has no head dimension; use by='pos'")

    def size(layer: int) -> int:  # positions, or the layer's heads (kv heads for hook_k/v; per layer on Gemma 4)
        value = clean_cache.cache_dict.get(f"blocks.{layer}.{full}")
        if value is None:  # a layer without this hook (KV-sharing layers have no hook_k / hook_v): a NaN row
            return 0
        return clean_tokens.shape[1] if by == "pos" else value.shape[head_dim]

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
    return PatchingResult(values, raw, by, full, clean_value, corrupted_value,
                          _str_tokens(model, clean_tokens), _str_tokens(model, corrupted_tokens))


# --- generation ---
def generate_with_patches(model: Any, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          patches: dict[int, Sequence[tuple[str, Callable]]] | None = None, **generate_kwargs):
    """`model.generate` with hooks active only at chosen steps: {step: [(hook name, fn)]}, step 0 being the
    prompt's forward and step t the forward that produces generated token t. With the KV cache, an edit of
    hook_k / hook_v (or anything upstream of them) is stored and persists into every later step."""
    return model.generate(tokens, attention_mask, step_hooks=patches or {}, **generate_kwargs)
