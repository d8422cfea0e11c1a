"""Forward-pass overhead of lens_det vs HF eager (and TransformerBridge / nnsight), CPU or GPU.

For each named config (random weights, no hub access) it times, in one process with
interleaved repeats (median of N after warm-up), under torch.no_grad():
  HF eager forward (use_cache=False)        vs  lens_det forward
  HF eager forward output_hidden_states     vs  lens_det run_with_cache (every hook)
  TransformerBridge forward / run_with_cache    (optional, skipped with a note on failure)
  nnsight empty trace / trace saving every layer output (optional, skipped if missing)
Ratios are against the matching HF row (targets: lens_det fwd <= 1.05, run_with_cache <= 1.20).

    python benchmarks/forward.py [--configs mid-bloom mid-gemma2 mid-gemma3] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from transformers import AutoModelForCausalLM

import _others
import lens_det
from lens_det.config import hf_config_from_name

TARGETS = {"lens_det": (1.05, 1.20)}


def build_cases(name, args, notes):
    """Return (cases {label: fn}, tokens, mask) for one config; labels are 'tool/fwd' or 'tool/cache'."""
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    hf_cfg = hf_config_from_name(name)
    hf = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").to(args.device, dtype).eval()
    vocab = hf.config.get_text_config().vocab_size
    tokens = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    mask = torch.ones_like(tokens)
    mask[min(1, args.batch - 1), : args.pad] = 0  # left padding on one row
    lens = lens_det.from_hf_model(hf).eval()

    with torch.no_grad():  # sanity check: logits must match HF bit for bit
        ref = hf(input_ids=tokens, attention_mask=mask, use_cache=False).logits
        out = lens(tokens, attention_mask=mask)
        real = mask.bool()
        d_all = (out - ref).abs().max().item()
        d_real = (out - ref).abs()[real].max().item()
    print(f"[{name}] lens_det vs HF logits: max|diff| all positions {d_all:.3g}, non-pad {d_real:.3g}")

    cases = {
        "HF/fwd": lambda: hf(input_ids=tokens, attention_mask=mask, use_cache=False),
        "HF/cache": lambda: hf(input_ids=tokens, attention_mask=mask, use_cache=False, output_hidden_states=True),
        "lens_det/fwd": lambda: lens(tokens, attention_mask=mask),
        "lens_det/cache": lambda: lens.run_with_cache(tokens, attention_mask=mask),
    }
    if not args.no_bridge:
        try:
            bridge = _others.bridge_from_hf(hf)
            with torch.no_grad():
                d = (_others.bridge_forward(bridge, tokens, mask) - ref).abs()[real].max().item()
            print(f"[{name}] bridge vs HF logits: max|diff| non-pad {d:.3g}")
            cases["bridge/fwd"] = lambda: _others.bridge_forward(bridge, tokens, mask)
            cases["bridge/cache"] = lambda: _others.bridge_run_with_cache(bridge, tokens, mask)
        except Exception as e:  # noqa: BLE001 -- optional competitor
            notes.append(f"{name}: TransformerBridge skipped ({type(e).__name__}: {str(e)[:120]})")
    if not args.no_nnsight:
        try:
            nn_model = _others.nnsight_from_hf(hf)
            cases["nnsight/fwd"] = lambda: _others.nnsight_forward(nn_model, tokens, mask)
            cases["nnsight/cache"] = lambda: _others.nnsight_trace_all_layers(nn_model, tokens, mask)
        except ImportError as e:
            notes.append(f"{name}: nnsight skipped ({e})")
    return cases


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_cases(cases, args):
    """Interleaved timing: each repeat runs every case once (order rotated per repeat); returns medians in ms."""
    labels = list(cases)
    times = {k: [] for k in labels}
    with torch.no_grad():
        for _ in range(args.warmup):
            for k in labels:
                cases[k]()
        for r in range(args.repeats):
            for k in labels[r % len(labels):] + labels[: r % len(labels)]:
                sync(args.device)
                t0 = time.perf_counter()
                out = cases[k]()
                sync(args.device)
                times[k].append((time.perf_counter() - t0) * 1e3)
                del out
    return {k: statistics.median(v) for k, v in times.items()}


def rows_for(name, med):
    rows = []
    for tool in ("HF", "lens_det", "bridge", "nnsight"):
        if f"{tool}/fwd" not in med:
            continue
        fwd, cache = med[f"{tool}/fwd"], med[f"{tool}/cache"]
        r_fwd, r_cache = fwd / med["HF/fwd"], cache / med["HF/cache"]
        tgt = TARGETS.get(tool)
        ok = "" if tgt is None else ("yes" if r_fwd <= tgt[0] and r_cache <= tgt[1] else "NO")
        rows.append([name, tool, f"{fwd:.1f}", f"{r_fwd:.3f}", f"{cache:.1f}", f"{r_cache:.3f}", ok])
    return rows


HEAD = ["config", "tool", "fwd ms", "fwd / HF fwd", "cache ms", "cache / HF hidden_states", "on target"]


def print_table(rows, markdown):
    if markdown:
        print("| " + " | ".join(HEAD) + " |")
        print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(HEAD))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(HEAD, *rows)]
    for r in [HEAD] + rows:
        print("  ".join(str(x).rjust(w) if i >= 2 else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["mid-bloom", "mid-gemma2", "mid-gemma3"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--pad", type=int, default=16, help="left padding on one row (default 16)")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per case (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-bridge", action="store_true", help="skip TransformerLens TransformerBridge")
    p.add_argument("--no-nnsight", action="store_true", help="skip nnsight")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="call lens_det.keep_freed_memory() first (process-wide: every tool benefits)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        print("lens_det.keep_freed_memory():", lens_det.keep_freed_memory())

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1]] + sys.argv))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"dtype {args.dtype}, batch {args.batch} x seq {args.seq} (row 1 left-padded by {args.pad}), "
          f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up")
    notes, rows = [], []
    if not args.no_nnsight:
        try:  # import up front: nnsight patches globals, so every tool is timed under the same conditions
            import nnsight  # noqa: F401
        except ImportError as e:
            notes.append(f"nnsight skipped ({e})")
            args.no_nnsight = True
    for name in args.configs:
        cases = build_cases(name, args, notes)
        med = time_cases(cases, args)
        rows += rows_for(name, med)
        del cases
    print()
    print_table(rows, args.markdown)
    print("\nfwd: plain forward (nnsight: empty trace saving logits). cache: HF output_hidden_states=True, "
          "lens_det/bridge run_with_cache (every hook), nnsight trace saving every layer output.")
    print("targets: lens_det fwd / HF fwd <= 1.05, lens_det cache / HF hidden_states <= 1.20")
    for n in notes:
        print("note:", n)


if __name__ == "__main__":
    main()
