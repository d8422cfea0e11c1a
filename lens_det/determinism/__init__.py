"""Invariance checks: does a prompt's every hook point depend on batch composition, prefill chunking, the KV
cache, the run, the thread count, or the device? Each check returns a `ParityReport` (0.0 tolerance) whose
first divergence names
the step, hook and op where invariance broke. Run them in the default mode to see the differences, and inside
`lens_det.deterministic()` (or with `model.deterministic = True`) to see them vanish.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lens_det.inputs import check_tokens
from lens_det.ops import deterministic
from lens_det.hooks import hook_kind
from lens_det.parity.compare import diff_chunked_run, prepare_inputs
from lens_det.parity.report import ParityReport, Schedule, diff_hook

__all__ = [
    "batch_invariance", "cache_invariance", "check_all", "chunk_invariance", "deterministic",
    "device_invariance", "plot_checks", "run_to_run", "thread_invariance",
]


def _tokens(model, tokens) -> torch.Tensor:
    """Token ids as a checked [batch, pos] tensor on the model's device (a 1-D tensor is one sequence)."""
    tokens = torch.as_tensor(tokens, device=model.cfg.device)
    return check_tokens(model, tokens[None] if tokens.ndim == 1 else tokens)


def _prompt(model, prompt) -> torch.Tensor:
    prompt = _tokens(model, prompt)
    if prompt.shape[0] != 1:
        raise ValueError(f"pass one prompt (a 1-D tensor of token ids), got shape {tuple(prompt.shape)}")
    return prompt


def _run(model, tokens, mask, position_ids="mask"):
    with torch.no_grad():
        logits, acts = model.run_with_cache(tokens, attention_mask=mask, position_ids=position_ids)
    return {**dict(acts.items()), "logits": logits}


def _diff_runs(report: ParityReport, step: str, ours: dict, ref: dict, row: int | None = None,
               pad: int = 0) -> None:
    """Append every hook of `ours` against `ref`: the whole batch, or only ours[hook][row] (whose real
    positions start at `pad`) against the one-row reference."""
    for hook, mine in ours.items():
        if row is not None:
            kind = hook_kind(hook)
            mine = mine.narrow(kind.layout.index("batch"), row, 1)  # batch is axis 1 of AltUp's stream stacks
            cut: list[slice] = [slice(None)] * mine.ndim  # the padding off every position axis (query and key)
            for axis in kind.position_axes:
                cut[axis] = slice(pad, None)
            mine = mine[tuple(cut)]
        report.rows.append(diff_hook(step, hook, mine, ref[hook], report.atol, report.rtol, 0))


def batch_invariance(model: Any, prompt, batch_sizes=(2, 3, 4, 8, 16), max_extra: int = 8, seed: int = 0,
                     position_ids: str = "mask") -> ParityReport:
    """The prompt alone vs the prompt inside batches of other random prompts of random lengths (up to
    `max_extra` longer), left-padded to the longest, at a varying row. 0.0 means batch-invariant."""
    prompt = _prompt(model, prompt)
    n = prompt.shape[1]
    report = ParityReport(f"batch invariance ({model.cfg.dtype})", Schedule(n, 0), 0.0, 0.0)
    reference = _run(model, prompt, None, position_ids)
    report.n_hooks = len(reference) - 1
    gen = torch.Generator().manual_seed(seed)
    for size in batch_sizes:
        lengths = torch.randint(1, n + max_extra + 1, (size,), generator=gen).tolist()
        row = size // 2
        lengths[row] = n
        width = max(lengths)
        tokens = torch.randint(0, model.cfg.d_vocab, (size, width), generator=gen).to(prompt.device)
        mask = torch.zeros_like(tokens)
        for i, length in enumerate(lengths):
            mask[i, width - length :] = 1
        tokens[row, width - n :] = prompt[0]
        _diff_runs(report, f"batch:{size}", _run(model, tokens, mask, position_ids), reference, row, width - n)
    return report


def chunk_invariance(model: Any, tokens, attention_mask=None, chunk_sizes=(1, 2, 3, 7, None),
                     position_ids: str = "mask") -> ParityReport:
    """Prefill through the KV cache in chunks of each size (None: all at once) vs one uncached forward."""
    tokens = _tokens(model, tokens)
    n = tokens.shape[1]
    tokens, mask, positions, schedule = prepare_inputs(model, tokens, attention_mask, position_ids, Schedule(n, 0),
                                                 None, None, 1)
    report = ParityReport(f"chunked-prefill invariance ({model.cfg.dtype})", schedule, 0.0, 0.0)
    full = _run(model, tokens, mask, positions)
    report.n_hooks = len(full) - 1
    for size in chunk_sizes:
        size = size or n
        bounds = [(a, min(a + size, n)) for a in range(0, n, size)]
        diff_chunked_run(report, model, tokens, mask, positions, bounds, full, full["logits"], f"chunk{size}")
    return report


def cache_invariance(model: Any, tokens, attention_mask=None, prefill: int | None = None,
                     position_ids: str = "mask") -> ParityReport:
    """Prefill then one token per step from the KV cache vs one uncached forward (lens_det.parity.self_parity
    at tolerance 0)."""
    from lens_det.parity import self_parity

    return self_parity(model, _tokens(model, tokens), attention_mask, position_ids, prefill=prefill, rtol=0.0)


def run_to_run(model: Any, tokens, attention_mask=None, repeats: int = 3, position_ids: str = "mask",
               ) -> ParityReport:
    """Repeated runs (same thread count) against the first."""
    tokens = _tokens(model, tokens)
    report = ParityReport(f"run-to-run ({model.cfg.dtype})", Schedule(tokens.shape[1], 0), 0.0, 0.0)
    reference = _run(model, tokens, attention_mask, position_ids)
    report.n_hooks = len(reference) - 1
    for i in range(1, repeats):
        _diff_runs(report, f"run:{i}", _run(model, tokens, attention_mask, position_ids), reference)
    return report


def thread_invariance(model: Any, tokens, threads=(1, 2, 3, 4), attention_mask=None,
                      position_ids: str = "mask") -> ParityReport:
    """Runs with each thread count in `threads` (an int or several) against one with the current count."""
    tokens = _tokens(model, tokens)
    threads = [threads] if isinstance(threads, int) else list(threads)
    report = ParityReport(f"thread count {torch.get_num_threads()} vs {threads} ({model.cfg.dtype})",
                          Schedule(tokens.shape[1], 0), 0.0, 0.0)
    reference = _run(model, tokens, attention_mask, position_ids)
    report.n_hooks = len(reference) - 1
    before = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            _diff_runs(report, f"threads:{n}", _run(model, tokens, attention_mask, position_ids), reference)
    finally:
        torch.set_num_threads(before)
    return report


def device_invariance(model: Any, tokens, attention_mask=None, devices=None,
                      position_ids: str = "mask") -> ParityReport | None:
    """The same run on each other device (a copy of the model) vs on the model's device; None when only one
    device exists. Different hardware runs different kernels, so this reports, it does not promise 0.0."""
    if devices is None:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    devices = [torch.device(d) for d in devices if torch.device(d) != model.cfg.device]
    if not devices:
        return None
    tokens = _tokens(model, tokens)
    report = ParityReport(f"device invariance ({model.cfg.dtype})", Schedule(tokens.shape[1], 0), 0.0, 0.0)
    reference = _run(model, tokens, attention_mask, position_ids)
    report.n_hooks = len(reference) - 1
    for device in devices:
        other = copy.deepcopy(model).to(device)
        mask = None if attention_mask is None else attention_mask.to(device)
        ours = {k: v.to(model.cfg.device) for k, v in _run(other, tokens.to(device), mask, position_ids).items()}
        _diff_runs(report, f"device:{device}", ours, reference)
    return report


def check_all(model: Any, prompt, batch_sizes=(2, 3, 4, 8, 16), chunk_sizes=(1, 2, 3, 7, None),
              threads=(1, 2, 3, 4)) -> dict[str, ParityReport]:
    """Every check on one prompt: {"batch", "chunk", "cache", "run", "threads", ("device")} -> report.
    `threads`: thread counts compared with the current one (None or () skips the check)."""
    prompt = _prompt(model, prompt)
    reports = {
        "batch": batch_invariance(model, prompt, batch_sizes),
        "chunk": chunk_invariance(model, prompt, chunk_sizes=chunk_sizes),
        "cache": cache_invariance(model, prompt, prefill=max(1, prompt.shape[1] // 2)),
        "run": run_to_run(model, prompt),
    }
    if threads:
        reports["threads"] = thread_invariance(model, prompt, threads)
    device = device_invariance(model, prompt)
    if device is not None:
        reports["device"] = device
    return reports


def plot_checks(results: dict[str, dict[str, ParityReport]], path=None):
    """Bar chart of max |diff| per check, one bar per mode, from {mode: check_all(...)} (e.g. {"default": ...,
    "deterministic": ...}). Log axis; an exact 0 has no bar (a log axis cannot show 0) and is written
    "0 = bit-identical" instead, so no reader takes it for a tiny non-zero difference."""
    import matplotlib.pyplot as plt

    modes, checks = list(results), list(next(iter(results.values())))
    values = {mode: [min(results[mode][check].max_abs(), 1e30) for check in checks] for mode in modes}
    nonzero = [v for row in values.values() for v in row if v > 0]
    floor, top = min([1e-9, *(v / 100 for v in nonzero)]), max([1.0, *(v * 10 for v in nonzero)])
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(checks), 3.8), layout="constrained")
    for i, mode in enumerate(modes):
        for j, value in enumerate(values[mode]):
            x = j + (i - (len(modes) - 1) / 2) * width
            if value > 0:
                ax.bar(x, value - floor, 0.9 * width, bottom=floor, color=f"C{i}")
                ax.text(x, value * 1.5, f"{value:.2g}", ha="center", va="bottom", fontsize=8)
            else:
                ax.text(x, floor * 2, "0 = bit-identical", rotation=90, ha="center", va="bottom", fontsize=8,
                        color=f"C{i}", fontweight="bold")
    ax.set_yscale("log")
    ax.set_ylim(floor, top)
    ax.set_xlim(-0.6, len(checks) - 0.4)  # room for the "0" labels of the outer bars
    ax.set_xticks(range(len(checks)), checks)
    ax.set_xlabel("what varies (check)")
    ax.set_ylabel("max |diff| over hook points")
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(modes))], modes,
               loc="outside upper center", ncols=len(modes), frameon=False)
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return fig
