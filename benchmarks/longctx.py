"""Long-prompt cost of lens_det vs HF, per attention implementation (eager / sdpa), CPU.

For each sequence length T and each variant it runs ONE forward (batch 1, random token ids, no hooks,
torch.no_grad()) in a fresh subprocess (this script re-invoked with --worker), so every measurement starts from
the same clean process and the peak memory is that forward's alone. Each worker builds the named config with random
weights (torch.manual_seed(0), no hub), runs a 16-token forward to warm up kernels, then times the first full-length
forward. For each T the variants run --repeats times, in an order rotated every repeat (and every T), so that
time-of-run effects (machine load, thermal state) are spread over the variants.

Variants (--variants; short aliases in brackets):
  "HF eager"  [hf-eager]    AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"),
                            model(input_ids=ids, use_cache=False)
  "HF sdpa"   [hf-sdpa]     the same with attn_implementation="sdpa"
  "lens_det eager" [ld-eager]  lens_det.from_hf_model(HF eager model, share_weights=True), model(tokens)
  "lens_det sdpa"  [ld-sdpa]   lens_det.from_hf_model(HF sdpa model, share_weights=True): lens_det follows the HF
                               model's config._attn_implementation
  "lens_det sdpa run_with_cache" [ld-sdpa-rwc]  (added by --names-filter) run_with_cache(tokens,
                               names_filter=lambda n: n.endswith("hook_resid_post")) instead of forward
  "lens_det eager run_with_cache" [ld-eager-rwc] the same on the eager model (only when listed in --variants)
The lens_det workers delete the HF model (and gc.collect()) before measuring, so only one copy of the weights
exists. Where the lens_det model has an `attn_implementation` attribute it must equal the requested one; a lens_det
sdpa variant on a lens_det without that attribute fails (rather than silently measuring eager attention). A failed
variant shows as "failed: <error>" in the table and its later runs are skipped (--retry-failed keeps trying).

Commands (run on a quiet machine; the full default run builds gemma-3-1b 40 times and takes hours on few cores):

    python benchmarks/longctx.py --json longctx.json
    python benchmarks/longctx.py --lengths 32768 --logits-to-keep 1 --variants ld-sdpa hf-sdpa --names-filter \\
        --json longctx-32k.json
    python benchmarks/longctx.py --config mid-gemma3 --lengths 128 256 --repeats 1        # smoke test

Columns:
  T                 prompt length (batch 1)
  variant           see above
  time s            median wall time of the one measured forward (seconds; time.perf_counter around the call)
  peak +MiB         median of (peak RSS during the forward - RSS just before it), MiB. Before the forward the worker
                    runs gc.collect() and glibc malloc_trim(0) (so memory freed while building is not silently
                    reused; --no-malloc-trim skips it), reads VmRSS, then resets the kernel's high-water mark
                    (writes "5" to /proc/self/clear_refs) and reads VmHWM after the forward. Where the reset is
                    refused it falls back to VmHWM before/after (then a build peak above the forward's hides the
                    forward's peak: the "mem method" in the JSON says which). Includes the returned logits
                    (1 x T x vocab in --dtype: 4 GiB for gemma-3-1b at T=8192 unless --logits-to-keep 1) and, for
                    run_with_cache, the cache.
  kept +MiB         median RSS right after the forward (output still alive) minus RSS before: what the result holds
  time / HF, mem / HF   lens_det variant / the HF variant with the same attention implementation (medians)
  = HF              whether the last position's logits equal that HF variant's bit for bit (sha1 of the bytes)
  runs s            every measured time, in run order
The ratio table repeats the ratios per T: lens_det sdpa / HF sdpa, lens_det eager / HF eager and
lens_det sdpa run_with_cache / HF sdpa. The header states the config, dtype, threads (torch.get_num_threads() in the
workers), CPU model (/proc/cpuinfo) and load average (os.getloadavg()) before and after; --json PATH writes the raw
per-run results (also the CPU time, page faults, 1-minute load, build time and RSS of every run).

On a shared machine the times are meaningless: with torch using every core, one competing process slows a forward
several-fold (seen while writing this: 0.17 s vs 2-4 s for the same worker). Check the load line and the spread of
"runs s" before reading the ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import hashlib
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {  # name -> (tool, attn implementation, run_with_cache)
    "HF eager": ("HF", "eager", False),
    "HF sdpa": ("HF", "sdpa", False),
    "lens_det eager": ("lens_det", "eager", False),
    "lens_det sdpa": ("lens_det", "sdpa", False),
    "lens_det sdpa run_with_cache": ("lens_det", "sdpa", True),
    "lens_det eager run_with_cache": ("lens_det", "eager", True),
}
ALIASES = {"hf-eager": "HF eager", "hf-sdpa": "HF sdpa", "ld-eager": "lens_det eager", "ld-sdpa": "lens_det sdpa",
           "ld-sdpa-rwc": "lens_det sdpa run_with_cache", "ld-eager-rwc": "lens_det eager run_with_cache"}
DEFAULT_VARIANTS = ["lens_det eager", "lens_det sdpa", "HF eager", "HF sdpa"]
RESULT_MARK = "LONGCTX_RESULT "
WARMUP_T = 16


# ---------------------------------------------------------------------------
# memory probes (Linux /proc)
# ---------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write "5" to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _digest(t) -> str:
    import torch

    row = t.detach()[0, -1].contiguous().to("cpu")  # the last position's logits (kept with any logits_to_keep)
    return hashlib.sha1(row.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# worker: one (variant, T) in this process
# ---------------------------------------------------------------------------


def worker(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import lens_det

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        lens_det.keep_freed_memory()
    variant, T = args.worker[0], int(args.worker[1])
    tool, impl, rwc = VARIANTS[variant]
    dtype = getattr(torch, args.dtype)
    res = {"variant": variant, "T": T, "threads": torch.get_num_threads(), "pid": os.getpid()}

    t0 = time.perf_counter()
    torch.manual_seed(0)
    hf_cfg = bench_config(args.config, args.layers)
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=impl).eval()
    got_impl = hf.config._attn_implementation
    if got_impl != impl:
        raise RuntimeError(f"HF model built with attn_implementation={impl!r} reports {got_impl!r}")
    vocab = hf.config.get_text_config().vocab_size
    if tool == "lens_det":
        model = lens_det.from_hf_model(hf, share_weights=True).eval()
        del hf
        gc.collect()
        ld_impl = getattr(model, "attn_implementation", None)
        res["lens_det_attn_implementation"] = ld_impl
        if ld_impl is None and impl != "eager":
            raise RuntimeError(f"this lens_det has no model.attn_implementation: cannot run {impl!r} attention "
                               "(it would measure eager)")
        if ld_impl is not None and ld_impl != impl:
            raise AssertionError(f"lens_det model.attn_implementation is {ld_impl!r}, requested {impl!r}")
        names_filter = lambda n: n.endswith("hook_resid_post")  # noqa: E731
        if rwc:
            call = lambda ids: model.run_with_cache(ids, names_filter=names_filter,  # noqa: E731
                                                    logits_to_keep=args.logits_to_keep)
        else:
            call = lambda ids: model(ids, logits_to_keep=args.logits_to_keep)  # noqa: E731
    else:
        model = hf
        call = lambda ids: model(input_ids=ids, use_cache=False, logits_to_keep=args.logits_to_keep)  # noqa: E731
    res["build_s"] = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, vocab, (1, T), generator=gen)  # the same ids for every variant at this T
    warm = torch.randint(0, vocab, (1, WARMUP_T), generator=torch.Generator().manual_seed(args.seed + 1))

    with torch.no_grad():
        t0 = time.perf_counter()
        out = call(warm)
        res["warmup_s"] = time.perf_counter() - t0
        del out
        gc.collect()
        if not args.no_malloc_trim:
            _malloc_trim()
        rss_before = _status_kib("VmRSS")
        hwm_before = _status_kib("VmHWM")
        reset = _reset_hwm()
        load1 = os.getloadavg()[0]
        flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = call(tokens)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0
        peak = _status_kib("VmHWM")
        rss_after = _status_kib("VmRSS")
    logits = out[0] if isinstance(out, tuple) else (out.logits if hasattr(out, "logits") else out)
    res.update(
        time_s=elapsed,
        cpu_s=cpu,  # user + system CPU time of the forward, all threads (OpenMP spin-waits included)
        load1_before=load1,
        minor_faults=faults,  # page faults during the forward (fresh pages from the OS)
        peak_inc_mib=(peak - rss_before) / 1024,
        kept_inc_mib=(rss_after - rss_before) / 1024,
        rss_before_mib=rss_before / 1024,
        peak_mib=peak / 1024,
        mem_method="clear_refs VmHWM" if reset else f"VmHWM (not reset; before {hwm_before / 1024:.0f} MiB)",
        logits_shape=list(logits.shape),
        logits_digest=_digest(logits),
    )
    if isinstance(out, tuple):
        res["cache_entries"] = len(out[1])
        res["cache_mib"] = sum(v.numel() * v.element_size() for v in out[1].values()) / 2**20
    return res


def worker_main(args) -> None:
    try:
        res = worker(args)
    except BaseException as e:  # noqa: BLE001 -- reported to the parent
        import traceback

        traceback.print_exc()
        res = {"variant": args.worker[0], "T": int(args.worker[1]), "error": f"{type(e).__name__}: {e}"}
    print(RESULT_MARK + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------
# parent: schedule the workers, print the tables
# ---------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def run_one(args, variant, T) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, str(T), "--config", args.config,
           *(["--layers", str(args.layers)] if args.layers else []),
           "--dtype", args.dtype, "--logits-to-keep", str(args.logits_to_keep), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.keep_freed_memory:
        cmd.append("--keep-freed-memory")
    if args.no_malloc_trim:
        cmd.append("--no-malloc-trim")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "T": T, "error": f"timed out after {args.timeout} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
            res["process_s"] = wall
            if "error" in res:
                res["stderr_tail"] = proc.stderr[-2000:]
            return res
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    if proc.returncode in (-9, 137):
        why += " (out of memory?)"
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    return {"variant": variant, "T": T, "error": f"{why}; {tail}".rstrip("; "), "stderr_tail": proc.stderr[-2000:]}


def summarize(results, variants, lengths):
    """{(T, variant): dict of medians, or {'error': ...}}."""
    out = {}
    for T in lengths:
        for v in variants:
            runs = [r for r in results if r["T"] == T and r["variant"] == v]
            ok = [r for r in runs if "error" not in r]
            if not ok:
                errs = [r["error"] for r in runs]
                out[T, v] = {"error": errs[0] if errs else "not run"}
                continue
            out[T, v] = {
                "time_s": statistics.median(r["time_s"] for r in ok),
                "peak_inc_mib": statistics.median(r["peak_inc_mib"] for r in ok),
                "kept_inc_mib": statistics.median(r["kept_inc_mib"] for r in ok),
                "digests": sorted({r["logits_digest"] for r in ok}),
                "runs": [r["time_s"] for r in ok],
                "n_failed": len(runs) - len(ok),
            }
    return out


def hf_ref(variant):
    tool, impl, _ = VARIANTS[variant]
    return None if tool == "HF" else f"HF {impl}"


def print_table(head, rows, markdown, n_left=2):
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" if i < n_left else "---:" for i in range(len(head))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for r in [head] + rows:
        print("  ".join(str(x).rjust(w) if i >= n_left else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths))))


def ratio(a, b, key):
    if "error" in a or "error" in b:
        return "-"
    return f"{a[key] / b[key]:.3f}" if b[key] > 0 else "-"


def tables(summary, variants, lengths, markdown):
    head = ["T", "variant", "time s", "peak +MiB", "kept +MiB", "time / HF", "mem / HF", "= HF", "runs s"]
    rows = []
    for T in lengths:
        for v in variants:
            s = summary[T, v]
            if "error" in s:
                rows.append([str(T), v, f"failed: {s['error']}"[:160]] + [""] * (len(head) - 3))
                continue
            ref = hf_ref(v)
            r = summary.get((T, ref)) if ref else None
            if r is None:
                t_r = m_r = same = ""
            else:
                t_r, m_r = ratio(s, r, "time_s"), ratio(s, r, "peak_inc_mib")
                same = "-" if "error" in r else ("yes" if s["digests"] == r["digests"] else "NO")
            failed = f" ({s['n_failed']} failed)" if s["n_failed"] else ""
            rows.append([str(T), v, f"{s['time_s']:.2f}", f"{s['peak_inc_mib']:.0f}", f"{s['kept_inc_mib']:.0f}",
                         t_r, m_r, same, ", ".join(f"{x:.2f}" for x in s["runs"]) + failed])
    print_table(head, rows, markdown)

    pairs = [(v, hf_ref(v)) for v in variants if hf_ref(v) in variants]
    if not pairs:
        return
    print()
    head = ["T", *[f"{a} / {b} {k}" for a, b in pairs for k in ("time", "mem")]]
    rows = []
    for T in lengths:
        row = [str(T)]
        for a, b in pairs:
            row += [ratio(summary[T, a], summary[T, b], "time_s"), ratio(summary[T, a], summary[T, b], "peak_inc_mib")]
        rows.append(row)
    print_table(head, rows, markdown, n_left=1)


def bench_config(name, layers=None):
    """The named config's HF config; with `layers`, only its first `layers` layers (same shapes per layer)."""
    from lens_det.config import hf_config_from_name

    c = hf_config_from_name(name)
    if layers:
        text = c.get_text_config() if hasattr(c, "get_text_config") else c
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = list(text.layer_types)[:layers]
    return c


def config_line(name, layers=None) -> str:
    c = bench_config(name, layers)
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    n_full = sum(t == "full_attention" for t in (getattr(c, "layer_types", None) or []))
    return (f"{name} ({type(c).__name__}: {c.num_hidden_layers} layers ({n_full} full attention), "
            f"d_model {c.hidden_size}, {c.num_attention_heads} heads / {c.num_key_value_heads} kv x "
            f"{getattr(c, 'head_dim', c.hidden_size // c.num_attention_heads)}, d_mlp {c.intermediate_size}, "
            f"vocab {c.vocab_size}, sliding window {getattr(c, 'sliding_window', None)})")


def parse_variant(s: str) -> str:
    v = ALIASES.get(s.lower(), s)
    if v not in VARIANTS:
        raise argparse.ArgumentTypeError(f"unknown variant {s!r}; choose from {list(VARIANTS)} or {list(ALIASES)}")
    return v


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gemma-3-1b", help="named config (random weights; default gemma-3-1b)")
    p.add_argument("--layers", type=int, default=None,
                   help="keep only the config's first N layers (same per-layer shapes; default: all)")
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--repeats", type=int, default=2, help="fresh-process runs per (variant, T); median reported")
    p.add_argument("--variants", nargs="+", type=parse_variant, default=None,
                   help=f"subset/order of variants (default {DEFAULT_VARIANTS}); aliases {list(ALIASES)}")
    p.add_argument("--names-filter", action="store_true",
                   help='add "lens_det sdpa run_with_cache" (names_filter=...hook_resid_post)')
    p.add_argument("--logits-to-keep", type=int, default=0, help="logits_to_keep for every variant (0: all)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids (weights: always seed 0)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="call lens_det.keep_freed_memory() in every worker (all variants alike)")
    p.add_argument("--no-malloc-trim", action="store_true",
                   help="skip malloc_trim(0) before the measured forward (then heap memory freed during the build "
                        "can be reused without showing in peak +MiB)")
    p.add_argument("--retry-failed", action="store_true",
                   help="keep running a variant after it failed (default: skip its later runs)")
    p.add_argument("--markdown", action="store_true", default=True, help=argparse.SUPPRESS)
    p.add_argument("--plain", dest="markdown", action="store_false", help="aligned text instead of markdown")
    p.add_argument("--json", metavar="PATH", help="write the raw per-run results as JSON")
    p.add_argument("--worker", nargs=2, metavar=("VARIANT", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return

    import torch

    variants = list(dict.fromkeys(args.variants or DEFAULT_VARIANTS))
    if args.names_filter and "lens_det sdpa run_with_cache" not in variants:
        variants.append("lens_det sdpa run_with_cache")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    print("command:", " ".join(shlex.quote(a) for a in ["python"] + sys.argv), flush=True)
    print(f"config {config_line(args.config, args.layers)}; dtype {args.dtype}; batch 1; "
          f"logits_to_keep {args.logits_to_keep}; "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; CPU {cpu_model()} "
          f"({os.cpu_count()} logical CPUs); load average before {' '.join(f'{x:.2f}' for x in load_before)}; "
          f"{args.repeats} fresh-process run(s) per (variant, T), order rotated; started {started}", flush=True)

    results, failed = [], {}
    n = len(variants)
    for ti, T in enumerate(args.lengths):
        for r in range(args.repeats):
            k = (ti * args.repeats + r) % n
            for v in variants[k:] + variants[:k]:
                if v in failed and not args.retry_failed:
                    results.append({"variant": v, "T": T, "error": f"skipped (failed at T={failed[v]})"})
                    continue
                res = run_one(args, v, T)
                results.append(res)
                if "error" in res:
                    failed.setdefault(v, T)
                    print(f"  T={T} repeat {r}: {v}: FAILED {res['error']}", flush=True)
                else:
                    print(f"  T={T} repeat {r}: {v}: {res['time_s']:.3f} s (cpu {res['cpu_s']:.2f} s on "
                          f"{res['threads']} threads), peak +{res['peak_inc_mib']:.0f} MiB; build "
                          f"{res['build_s']:.1f} s, process {res['process_s']:.1f} s, load1 {res['load1_before']:.2f}",
                          flush=True)
    load_after = os.getloadavg()
    threads = sorted({r["threads"] for r in results if "threads" in r})
    loads = [r["load1_before"] for r in results if "load1_before" in r]
    print(f"\nload average before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in load_after)} (1-min load at the measured forwards: "
          f"{f'{min(loads):.2f}-{max(loads):.2f}' if loads else 'n/a'}, this benchmark's own worker included); "
          f"worker threads {threads}; "
          f"memory method {sorted({r['mem_method'].split(' (')[0] for r in results if 'mem_method' in r})}\n")
    summary = summarize(results, variants, args.lengths)
    tables(summary, variants, args.lengths, args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "config": args.config, "config_line": config_line(args.config, args.layers),
                       "dtype": args.dtype, "logits_to_keep": args.logits_to_keep, "repeats": args.repeats,
                       "lengths": args.lengths, "variants": variants, "cpu": cpu_model(),
                       "cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__,
                       "load_before": load_before, "load_after": load_after, "started": started,
                       "results": results}, f, indent=1)
        print(f"\nraw results: {args.json}")


if __name__ == "__main__":
    main()
