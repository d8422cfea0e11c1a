"""ParityReport: per hook x step differences, coverage and the first divergence, as text, JSON or a plot."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

import torch

from lens_det.hooks import HOOK_KINDS, OUTPUT_KINDS, hook_kind


@dataclass(frozen=True)
class Schedule:
    """How the cached run is fed: `prefill` tokens at once, then `decode_steps` calls of `chunk` tokens."""

    prefill: int
    decode_steps: int
    chunk: int = 1

    @property
    def length(self) -> int:
        return self.prefill + self.decode_steps * self.chunk

    @property
    def label(self) -> str:
        """Short form, prefill+steps x chunk: "5+11x1"."""
        return f"{self.prefill}+{self.decode_steps}x{self.chunk}"

    def bounds(self) -> list[tuple[int, int]]:
        ends = [self.prefill + self.chunk * s for s in range(self.decode_steps + 1)]
        return list(zip([0, *ends[:-1]], ends))

    @classmethod
    def fit(cls, n_tokens: int, prefill: int | None = None, decode_steps: int | None = None,
            chunk: int = 1) -> Schedule:
        """A schedule over `n_tokens`: prefill defaults to half, decode_steps to as many as fit."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        prefill = max(1, n_tokens // 2) if prefill is None else prefill
        if prefill < 1:
            raise ValueError(f"prefill must be >= 1, got {prefill}")
        if decode_steps is None:
            decode_steps = max(0, (n_tokens - prefill) // chunk)
        schedule = cls(prefill, decode_steps, chunk)
        if schedule.length > n_tokens:
            raise ValueError(
                f"the schedule needs {schedule.length} tokens (prefill {prefill} + {decode_steps} steps x "
                f"{chunk}) but only {n_tokens} were given; pass more tokens or a shorter schedule"
            )
        return schedule


@dataclass
class HookDiff:
    step: str  # "uncached" or "cached:<i>" (i = 0 is the prefill)
    hook: str
    layer: int | None
    max_abs: float
    max_rel: float  # max |diff| / max |reference| (masked score entries excluded)
    bitwise: bool
    passed: bool
    position: int | None = None  # first absolute position over tolerance
    head: int | None = None  # first head over tolerance at that position


# The op that produces each hook kind (lens_det.hooks.HOOK_KINDS), keyed as `kind_of` writes it: the first
# differing hook in firing order names the op that broke.
OPS = {kind.key.removeprefix("blocks."): kind.op for kind in (*HOOK_KINDS.values(), *OUTPUT_KINDS.values())}


def op_of(hook: str) -> str:
    """The op that computes a hook point ("?" for a name that is no lens_det hook point)."""
    try:
        return hook_kind(hook).op
    except KeyError:
        return "?"


def layer_of(hook: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else None


def kind_of(hook: str) -> str:
    """A hook name without its "blocks.{i}." (how rows, heatmap lines and `OPS` name a hook kind)."""
    return re.sub(r"^blocks\.\d+\.", "", hook)


def diff_hook(step: str, hook: str, ours: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float,
              offset: int) -> HookDiff:
    """Compare one hook's tensors; `offset` is the absolute position of the first new token."""
    if ours.shape != ref.shape:
        return HookDiff(step, hook, layer_of(hook), math.inf, math.inf, False, False)
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    d = (a - b).abs()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))  # equal infinities too: inf - inf would be NaN
    d = torch.where(same, torch.zeros_like(d), d.nan_to_num(nan=math.inf))
    finite = b[b > torch.finfo(ref.dtype).min / 2] if ref.is_floating_point() else b
    scale = finite.abs().max().item() if finite.numel() else 0.0
    max_abs = d.max().item() if d.numel() else 0.0
    threshold = atol + rtol * scale
    result = HookDiff(step, hook, layer_of(hook), max_abs, max_abs / scale if scale else max_abs,
                      bool(max_abs == 0.0), max_abs <= threshold)
    if not result.passed:
        over = d > threshold
        kind = hook_kind(hook)
        pos_dim, head_dim = kind.pos_axis, kind.head_axis
        if over.ndim > pos_dim:
            pos = over.movedim(pos_dim, 0).reshape(over.shape[pos_dim], -1).any(1).nonzero()[0, 0].item()
            result.position = offset + pos
            if head_dim is not None:
                at_pos = over.select(pos_dim, pos)
                dim = head_dim if head_dim < pos_dim else head_dim - 1
                result.head = at_pos.movedim(dim, 0).reshape(at_pos.shape[dim], -1).any(1).nonzero()[0, 0].item()
    return result


@dataclass
class ParityReport:
    """Differences of every hook point, uncached and on each cached step of a schedule."""

    title: str
    schedule: Schedule
    atol: float
    rtol: float
    rows: list[HookDiff] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # hook -> why it has no reference
    n_hooks: int = 0
    processing: tuple[str, ...] = ()  # weight-processing steps applied to the lens_det model
    not_compared: dict[str, str] = field(default_factory=dict)  # hook -> why it is not compared (a processing
    # step that changed its meaning, or sdpa, which computes no attention pattern)
    attn_implementation: str | None = None  # what both models ran ("eager" / "sdpa"; None: not recorded)
    inputs: str | None = None  # what the models were fed (e.g. the prompt), for the text, JSON and heatmap title

    @property
    def passed(self) -> bool:
        return not self.missing and all(r.passed for r in self.rows)

    @property
    def decode_steps_compared(self) -> int:
        """How many compared cached steps read the KV cache: the steps after the prefill ("cached:<i>", i >= 1;
        "cached:0", the prefill, only writes it). 0 with cached rows: the cache path was not checked."""
        return len({r.step for r in self.rows if r.step.startswith("cached:") and r.step != "cached:0"})

    @property
    def _cache_never_read(self) -> bool:
        return self.decode_steps_compared == 0 and any(r.step.startswith("cached") for r in self.rows)

    @property
    def coverage(self) -> float:
        return 1.0 if not self.n_hooks else (self.n_hooks - len(self.missing)) / self.n_hooks

    @property
    def first_divergence(self) -> HookDiff | None:
        """The earliest failing (step, hook in execution order, position, head): rows are kept in that order."""
        return next((r for r in self.rows if not r.passed), None)

    def worst(self, n: int = 10) -> list[HookDiff]:
        return sorted(self.rows, key=lambda r: -r.max_abs)[:n]

    def max_abs(self, cached: bool | None = None) -> float:
        rows = [r for r in self.rows if cached is None or r.step.startswith("cached") == cached]
        return max((r.max_abs for r in rows), default=0.0)

    def to_text(self, n_worst: int = 8) -> str:
        s = self.schedule
        tol = "0 (bit-identical)" if self.atol == 0 == self.rtol else f"atol {self.atol:g} + rtol {self.rtol:g}"
        changed = {h for h, why in self.not_compared.items() if why.startswith("changed by")}
        other = {h: why for h, why in self.not_compared.items() if h not in changed}
        lines = [
            f"{self.title}",
            *([f"  attention: {self.attn_implementation} (both models)"] if self.attn_implementation else []),
            *([f"  inputs: {self.inputs}"] if self.inputs else []),
            f"  schedule: prefill {s.prefill}, {s.decode_steps} decode steps of {s.chunk} ({s.label}); tolerance {tol}",
            *(["  no cached decode step: the prefill wrote the KV cache, which was never read, so the cached numbers "
               "are the prefill's and the cache is not checked; give the schedule decode steps (more tokens than the "
               "prefill, decode_steps >= 1)"] if self._cache_never_read else []),
            f"  coverage: {self.n_hooks - len(self.missing)}/{self.n_hooks} hook points have a reference"
            + (f"; missing: {self.missing}" if self.missing else ""),
            *([f"  processed weights ({', '.join(self.processing)}): {len(changed)} hook points not "
               f"compared, their meaning changed: {', '.join(sorted({kind_of(h) for h in changed}))}"]
              if self.processing else []),
            *[f"  {sum(w == why for w in other.values())} hook points not compared "
              f"({', '.join(sorted({kind_of(h) for h, w in other.items() if w == why}))}): {why}"
              for why in dict.fromkeys(other.values())],
            f"  max |diff|: uncached {self.max_abs(False):.3g}, cached {self.max_abs(True):.3g} -> "
            + ("PASS" if self.passed else "FAIL"),
        ]
        first = self.first_divergence
        if first is not None:
            lines.append(f"  first divergence: {first.step}, layer {first.layer}, {kind_of(first.hook)} "
                         f"(op: {op_of(first.hook)}), {_where(first)} (max |diff| {first.max_abs:.3g})")
        lines.append(f"  worst hooks:  {'step':<10} {'hook':<36} {'max|diff|':>10} {'rel':>9}  bitwise")
        for r in self.worst(n_worst):
            lines.append(f"                {r.step:<10} {r.hook:<36} {r.max_abs:>10.3g} {r.max_rel:>9.2g}  "
                         f"{'yes' if r.bitwise else 'no'}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "title": self.title, "attn_implementation": self.attn_implementation, "inputs": self.inputs,
            "schedule": asdict(self.schedule), "decode_steps_compared": self.decode_steps_compared,
            "atol": self.atol, "rtol": self.rtol,
            "passed": self.passed, "coverage": self.coverage, "missing": self.missing,
            "processing": list(self.processing), "not_compared": self.not_compared,
            "first_divergence": None if self.first_divergence is None else asdict(self.first_divergence),
            "rows": [asdict(r) for r in self.rows],
        }

    def save_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1, default=str)

    def heatmap_data(self) -> tuple[list[str], list[str], dict[bool, list[list[float | None]]]]:
        """(rows, columns, {cached: grid}) behind `plot`. Rows are hook kinds in the order they fire (so an
        error's spread reads top to bottom); columns are "embed", the layers and "final" (top-level hooks:
        hook_embed and embed.ln.* in "embed", ln_final.* and logits in "final"). Cells hold the max |diff| over
        the steps of that half (None where nothing was compared); a half with no rows at all is left out."""
        kinds: list[str] = []
        for r in self.rows:
            if kind_of(r.hook) not in kinds:
                kinds.append(kind_of(r.hook))
        n_layers = 1 + max((r.layer for r in self.rows if r.layer is not None), default=-1)
        columns = ["embed", *map(str, range(n_layers)), "final"]
        halves = [c for c in (False, True) if any(r.step.startswith("cached") == c for r in self.rows)]
        grids = {c: [[None] * len(columns) for _ in kinds] for c in halves}
        for r in self.rows:
            cell = grids[r.step.startswith("cached")][kinds.index(kind_of(r.hook))]
            col = _column(r, len(columns))
            cell[col] = max(cell[col] or 0.0, r.max_abs)
        return kinds, columns, grids

    def plot(self, path=None, vmin: float = -8.0, vmax: float = 1.0):
        """Heatmap of log10 max |diff| by hook (in firing order) x layer, cache off and on. Exact zeros
        (bit-identical) are green, outside the colour scale; non-zero diffs are clipped into [vmin, vmax], so
        the smallest non-zero one is still dark, never green. Blank: not compared. Red box: first divergence."""
        import matplotlib
        import matplotlib.pyplot as plt
        import numpy as np
        from matplotlib import patheffects
        from matplotlib.patches import Rectangle

        kinds, columns, grids = self.heatmap_data()
        cell_width = max(0.2, min(0.42, 8 / len(columns)))  # inches; narrower for deep models
        fig, axes = plt.subplots(1, len(grids), figsize=(3.5 + cell_width * len(columns) * len(grids),
                                                         2.0 + 0.24 * len(kinds)),
                                 squeeze=False, layout="constrained")
        cmap = matplotlib.colormaps["magma"].with_extremes(bad="white", under="#8fd18a")  # green: exactly 0
        first = self.first_divergence
        for ax, (cached, cells) in zip(axes[0], grids.items()):
            grid = np.array([[np.nan if v is None else -np.inf if v == 0 else np.clip(np.log10(v), vmin, vmax)
                              for v in row] for row in cells], dtype=float)
            image = ax.imshow(np.ma.masked_invalid(np.where(grid == -np.inf, vmin - 1, grid)), aspect="auto",
                              cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title("cache off" if not cached else
                         "cache on: prefill only, never read" if self._cache_never_read else "cache on", fontsize=9)
            ax.set_xticks(range(len(columns)), columns, fontsize=7, rotation=90 if len(columns) > 14 else 0)
            ax.set_xlabel("layer")
            ax.set_yticks(range(len(kinds)), kinds if ax is axes[0, 0] else [], fontsize=7)
            for x in (0.5, len(columns) - 1.5):  # embed | layers | final
                ax.axvline(x, color="0.6", linewidth=0.8)
            if first is not None and first.step.startswith("cached") == cached:
                box = Rectangle((_column(first, len(columns)) - 0.5, kinds.index(kind_of(first.hook)) - 0.5), 1, 1,
                                fill=False, edgecolor="red", linewidth=2.5)
                box.set_path_effects([patheffects.withStroke(linewidth=5, foreground="white")])  # visible on red
                ax.add_patch(box)
        bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, extend="min",
                           label="log10 max |diff|\n(green \u25bc = exactly 0, bit-identical)")
        ticks = list(range(math.ceil(vmin), math.floor(vmax) + 1))
        bar.set_ticks(ticks, labels=[("\u2264" if t == vmin else "\u2265" if t == vmax else "")
                                      + str(t).replace("-", "\u2212") for t in ticks])
        if first is None:
            note = "every compared value bit-identical" if self.max_abs() == 0 else "every hook within tolerance"
        else:
            layer = "top level" if first.layer is None else f"layer {first.layer}"
            note = (f"red box = first divergence: step {first.step}, {layer}, {kind_of(first.hook)}\n"
                    f"(op: {op_of(first.hook)}, {_where(first)}, max |diff| {first.max_abs:.3g})")
        title = self.title
        if self.attn_implementation and self.attn_implementation not in title:
            title += f" [{self.attn_implementation} attention]"
        s = self.schedule
        schedule = f"schedule {s.label}: " + (
            f"a prefill of {s.prefill} tokens, then {s.decode_steps} decode step{'s' * (s.decode_steps > 1)} of "
            f"{s.chunk} token{'s' * (s.chunk > 1)}" if s.decode_steps else f"the prefill of {s.prefill} tokens alone, "
            "no decode step")
        inputs = "" if not self.inputs else "\n" + _cut(self.inputs, 90)
        fig.suptitle(f"{title}\n{schedule}{inputs}\n{note}\ngreen: bit-identical, white: not compared", fontsize=9)
        if path is not None:
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
        return fig


def _cut(text: str, width: int) -> str:
    """`text` on one line of at most `width` characters, cut with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _where(row: HookDiff) -> str:
    """Where a failing row first goes over tolerance, e.g. "position 8, head 0" ("shapes differ" if unknown)."""
    if row.position is None:
        return "shapes differ" if row.max_abs == math.inf else "position unknown"
    return f"position {row.position}" + ("" if row.head is None else f", head {row.head}")


def _column(row: HookDiff, n_columns: int) -> int:
    """The heatmap column of a row: 0 for embedding hooks, 1 + layer, n_columns - 1 for ln_final and logits."""
    if row.layer is not None:
        return row.layer + 1
    return 0 if "embed" in row.hook else n_columns - 1
