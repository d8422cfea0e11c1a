"""The `lens-det` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lens_det.presets import tiny_configs

TINY = tiny_configs()
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnknownModel(SystemExit):
    pass


def _check_source(name: str) -> None:
    """Fail fast, with what to do, for a --model that is no named config, local directory or reachable hub id
    (instead of the hub client's retries and traceback)."""
    import difflib
    from pathlib import Path

    from lens_det.config import named_configs

    records = named_configs()
    record = records.get(name)
    if record is not None and not record.get("hf_name"):  # random weights: nothing to fetch
        return
    source = record["hf_name"] if record else name
    if Path(source).expanduser().is_dir():
        return
    if record is None:
        close = difflib.get_close_matches(name, list(records), n=3, cutoff=0.75)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        if close or name.startswith(("/", ".", "~")) or name.count("/") != 1:
            raise UnknownModel(f"unknown model {name!r}: not a named config{hint} (`lens-det models` lists them), "
                               "not a local directory, and not a hub id of the form org/name")
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    try:
        HfApi().model_info(source, timeout=5)
    except Exception as err:  # noqa: BLE001 - reported with what to do
        raise UnknownModel(f"cannot load {name!r}: {source!r} is not a local directory, not in the local HF cache, "
                           f"and the HF hub could not be reached or has no such repo ({type(err).__name__}); "
                           "`lens-det models` lists the named configs, tiny-* ones need no download") from None


def _sdpa_refusal(name: str) -> str | None:
    """Why `name` (a named config, hub id or local directory) cannot run sdpa attention; None if it can."""
    from lens_det.config import LensConfig, hf_config_from_name, named_configs
    from lens_det.hf import sdpa_refusal

    record = named_configs().get(name)
    if record is not None:
        hf_config = hf_config_from_name(name)
    else:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(name)
    return sdpa_refusal(LensConfig.from_hf_config(hf_config))


def _models(name: str, dtype: torch.dtype, seed: int, experts_implementation: str | None = None,
            attn_implementation: str = "eager"):
    """(hf_model, lens_model): a named config gets seeded random weights, anything else is loaded. HF is built with
    `attn_implementation` ("eager" or "sdpa") and lens_det runs the same; MoE models: HF is built with
    `experts_implementation` (None: HF's default) and lens_det copies it."""
    import lens_det
    from lens_det.config import named_configs

    record = named_configs().get(name)
    if record is not None and record.get("hf_name") is None:  # an embedded test config: random weights
        from lens_det.hf.random_models import random_hf_model

        hf = random_hf_model(name, dtype, seed, experts_implementation=experts_implementation,
                             attn_implementation=attn_implementation)
    else:
        from transformers import AutoModelForCausalLM

        source = record["hf_name"] if record else name
        extra = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                                                  **extra).eval()
    model = lens_det.from_hf_model(hf)  # runs what HF runs (attn_implementation included)
    if record is None or record.get("hf_name"):  # a checkpoint: its tokenizer, for --prompt
        from lens_det.hf.checkpoint import load_tokenizer, local_dir

        model.tokenizer = load_tokenizer(local_dir(record["hf_name"] if record else name))
    else:  # random weights: the offline character tokenizer
        from lens_det.tokenizer import char_tokenizer

        model.tokenizer = char_tokenizer(model.cfg)
    return hf, model


def _inputs(model, args):
    """(tokens, mask) from --tokens / --prompt, or random ids; --padding pads the first row."""
    if args.tokens:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in args.tokens.split(";")]
        width = max(map(len, rows))
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, row in enumerate(rows):  # left padding
            tokens[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
        return tokens, mask
    if args.prompt:
        if model.tokenizer is None:
            raise SystemExit("--prompt needs a checkpoint with a tokenizer; use --tokens with token ids instead")
        return model.to_tokens(args.prompt, padding_side="right" if args.padding == "right" else "left")
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.length), generator=gen)
    mask = torch.ones_like(tokens)
    pad = max(1, args.length // 4)
    if args.padding == "left":
        mask[0, :pad] = 0
    elif args.padding == "right":
        mask[0, -pad:] = 0
    return tokens, mask


def _describe_inputs(args) -> str:
    """What `_inputs` feeds the models, in words (the reports' `inputs`)."""
    if args.tokens:
        return f"token ids {args.tokens}"
    if args.prompt:
        if len(args.prompt) == 1:
            return f"prompt {args.prompt[0]!r}"
        side = "right" if args.padding == "right" else "left"
        return f"prompts {', '.join(map(repr, args.prompt))} ({side}-padded)"
    padding = "no padding" if args.padding == "none" else f"first row {args.padding}-padded"
    return f"random token ids, {args.batch} x {args.length} (seed {args.seed}, {padding})"


def _decode_steps(n_tokens: int, args) -> int:
    """--decode-steps, by default as many as `n_tokens` allow after --prefill but at least 1: a schedule without
    decode steps never reads the KV cache."""
    if args.decode_steps is not None:
        return args.decode_steps
    return max(1, (n_tokens - args.prefill) // args.chunk)


def _continued(model, tokens, mask, args):
    """(tokens, mask, n_new): tokens long enough for --prefill + _decode_steps x --chunk. A shorter input is
    extended by the n_new tokens of lens_det's greedy continuation (bit-identical to HF generate's), so the cached
    steps run on the model's own text."""
    missing = args.prefill + _decode_steps(tokens.shape[1], args) * args.chunk - tokens.shape[1]
    if missing <= 0:
        return tokens, mask, 0
    if args.padding == "right" and not bool(mask[:, -1].all()):
        raise SystemExit(f"the schedule needs {missing} more tokens than the input has, and a right-padded input "
                         "cannot be continued; use --padding left, or fewer --prefill/--decode-steps")
    out = model.generate(tokens, mask, max_new_tokens=missing, stop_tokens=[])
    return out.tokens, out.attention_mask, missing


def _suffixed(path: str, name: str, dtype: str, several: bool) -> str:
    if not several:
        return path
    stem, dot, ext = path.rpartition(".")
    tag = f"{name.replace('/', '_')}-{dtype}"
    return f"{stem}-{tag}.{ext}" if dot else f"{path}-{tag}"


def cmd_parity(args) -> int:
    import json

    from lens_det.parity import compare

    for flag, value, least in (("--prefill", args.prefill, 1), ("--decode-steps", args.decode_steps, 0),
                               ("--chunk", args.chunk, 1)):
        if value is not None and value < least:
            raise SystemExit(f"{flag} must be >= {least}, got {value}")
    names = args.model or TINY
    for name in names:
        _check_source(name)
    impl = args.attn_implementation
    skipped = {}
    if impl == "sdpa":
        refused = {name: why for name in names if (why := _sdpa_refusal(name))}
        if args.model and refused:
            raise SystemExit("--attn-implementation sdpa is not available for "
                             + "; ".join(f"{name} ({why})" for name, why in refused.items())
                             + ": use --attn-implementation eager")
        skipped, names = refused, [name for name in names if name not in refused]
    several = len(names) * len(args.dtype) > 1
    tol = "0 (bit-identical)" if args.atol == 0 == args.rtol else f"atol {args.atol:g} + rtol {args.rtol:g}"
    print(f"lens-det parity: every hook point vs the HF reference ({impl} attention), uncached and with both KV "
          f"caches on the same schedule; tolerance {tol}")
    if impl == "sdpa":
        print("  sdpa computes no attention pattern: hook_attn_scores / hook_pattern are not compared")
    if skipped:
        print(f"  skipped (eager-only, HF has no sdpa for them): {', '.join(skipped)}")
    header = (f"{'model':<20} {'dtype':<9} {'hooks':>5} {'coverage':>8} {'uncached':>9} {'cached':>9}  "
              f"{'schedule':<16} result")
    print(header)
    print("-" * len(header))
    failed, reports = False, []
    for name in names:
        for dtype_name in args.dtype:
            start = time.perf_counter()
            hf, model = _models(name, DTYPES[dtype_name], args.seed, args.experts_implementation, impl)
            model.set_use_attn_result(True)
            model.set_use_hook_mlp_in(True)
            model.set_use_split_qkv_input(True)  # hook_attn_in is its alternative, checked by the test suite
            tokens, mask, n_new = _continued(model, *_inputs(model, args), args)
            positions = "mask" if model.cfg.positional == "rope" and args.positions == "mask" else None
            report = compare(model, hf, tokens, mask, positions, prefill=args.prefill,
                             decode_steps=_decode_steps(tokens.shape[1], args), chunk=args.chunk, atol=args.atol,
                             rtol=args.rtol, title=f"{name} ({dtype_name}, {impl} attention)")
            continued = f"continued greedily by {n_new} token{'s' if n_new > 1 else ''}" if n_new else ""
            report.inputs = _describe_inputs(args) + (f", {continued}" if continued else "")
            reports.append(report)
            failed |= not report.passed
            first = report.first_divergence
            result = "PASS" if report.passed else (
                f"FAIL at {first.step}, {first.hook}, pos {first.position}" if first else "FAIL (coverage)")
            if not report.decode_steps_compared:
                result += " (no step read the KV cache)"
            print(f"{name:<20} {dtype_name:<9} {report.n_hooks:>5} {report.coverage:>8.0%} "
                  f"{report.max_abs(False):>9.3g} {report.max_abs(True):>9.3g}  "
                  f"{report.schedule.label:<16} {result}  [{time.perf_counter() - start:.1f}s]")
            if continued:
                print(f"{'':<20} input {continued} (lens_det's, equal to HF generate's): the schedule needs "
                      f"{report.schedule.length} tokens")
            if args.plot:
                report.plot(_suffixed(args.plot, name, dtype_name, several))
    for report in reports:
        if not report.passed or args.verbose:
            print("\n" + report.to_text())
    if args.json:
        payload = [r.to_json() for r in reports]
        with open(args.json, "w") as f:
            json.dump(payload if several else payload[0], f, indent=1, default=str)
    exact = "all hook points" if impl == "eager" else "all hook points sdpa has"
    unread = sum(not r.decode_steps_compared for r in reports)
    if failed:
        verdict = "FAIL: differences over tolerance (details above)"
    elif unread:
        verdict = (f"PASS, but in {unread} of {len(reports)} runs no step read the KV cache (--decode-steps 0: the "
                   "cached run was the prefill alone), so the cache was not checked")
    else:
        verdict = f"{exact} bit-identical, cache off and on" if args.atol == 0 == args.rtol else "PASS"
    print("\n" + verdict)
    return 1 if failed else 0


def cmd_determinism(args) -> int:
    from lens_det.determinism import check_all
    from lens_det.determinism.audit import environment
    from lens_det.ops import deterministic
    from lens_det.parity.report import kind_of, op_of

    if args.cpu_levels:
        return _across_cpu_levels(args)
    if args.audit:
        return _audit(args)
    for name in args.model or ():
        _check_source(name)
    env = environment()
    print("lens-det determinism: a prompt's every hook point alone vs in batches of 2..16 (with padding), prefill "
          f"chunked 1/2/3/7/all, cache on vs off, repeated runs, {args.threads} threads; max |diff| per check "
          f"(0 = bit-identical)\nran under: CPU capability {env['cpu_capability']}, {env['threads']} threads, "
          f"{env['blas']}, torch {env['torch']}")
    header = f"{'model':<18} {'dtype':<9} {'mode':<14} " + " ".join(f"{c:>9}" for c in CHECKS) + "  first divergence"
    print(header)
    print("-" * len(header))
    broken = False
    for name in args.model or TINY:
        for dtype_name in args.dtype:
            _, model = _models(name, DTYPES[dtype_name], args.seed)
            gen = torch.Generator().manual_seed(args.seed)
            prompt = torch.randint(0, model.cfg.d_vocab, (args.length,), generator=gen)
            for mode in ("default", "deterministic"):
                with deterministic(mode == "deterministic"):
                    reports = check_all(model, prompt, threads=args.threads)
                cells = " ".join(f"{reports[c].max_abs():>9.2g}" if c in reports else f"{'-':>9}" for c in CHECKS)
                first = next((r.first_divergence for r in reports.values() if r.first_divergence), None)
                where = "-" if first is None else \
                    f"{first.step} {kind_of(first.hook)} (layer {first.layer}, op {op_of(first.hook)})"
                print(f"{name:<18} {dtype_name:<9} {mode:<14} {cells}  {where}")
                contract = [r for c, r in reports.items() if c != "device"]
                broken |= mode == "deterministic" and any(not r.passed for r in contract)
    print("\ndeterministic mode: bitwise invariant" if not broken else "\nFAIL: deterministic mode varied")
    return 1 if broken else 0


def _audit(args) -> int:
    from lens_det.determinism.audit import audit, environment, format_rows

    print(f"lens-det determinism --audit: every op of the deterministic mode, a row alone vs inside bigger calls "
          f"(any offset, threads 1-4), float32 and bfloat16\nran under: {environment()}")
    rows = audit()
    print(format_rows(rows))
    return 0 if all(r.passed for r in rows) else 1


def _across_cpu_levels(args) -> int:
    """Rerun this command once per CPU capability level (a fresh process each: the level is fixed at start)."""
    import os
    import subprocess

    from lens_det.determinism.audit import supported_levels

    argv = [a for a in sys.argv[1:] if a != "--cpu-levels"]
    status = 0
    for level in supported_levels():
        print(f"\n=== ATEN_CPU_CAPABILITY={level}", flush=True)
        env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
        status |= subprocess.run([sys.executable, "-m", "lens_det.cli", *argv], env=env).returncode
    return status


CHECKS = ("batch", "chunk", "cache", "run", "threads", "device")


def cmd_models(args) -> int:
    from lens_det.config import named_configs

    print(f"{'name':<20} {'family':<12} {'weights':<34} notes")
    for name, record in named_configs().items():
        weights = record.get("hf_name") or "random (test/benchmark config)"
        notes = (record.get("notes") or "").split(";")[0][:60]
        print(f"{name:<20} {record['hf_config']['model_type']:<12} {weights:<34} {notes}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lens-det", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="compare every hook point with the HF reference, cache off and on")
    p.add_argument("--model", nargs="*", help="named configs, HF hub names or local dirs (default: the tiny configs)")
    p.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"], choices=list(DTYPES),
                   help="dtypes to load and compare both models in (default: float32 bfloat16)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", nargs="+", help="text prompts (needs the checkpoint's tokenizer)")
    source.add_argument("--tokens", help="token ids: '1,2,3;4,5' (rows separated by ';', left-padded)")
    p.add_argument("--padding", default="left", choices=["left", "right", "none"],
                   help="how the first row of random tokens (or a batch of prompts) is padded (default: left)")
    p.add_argument("--positions", default="mask", choices=["mask", "arange"],
                   help="RoPE positions for both models: HF generate's (mask) or HF forward's default (arange)")
    p.add_argument("--batch", type=int, default=2, help="rows of random tokens (without --prompt/--tokens)")
    p.add_argument("--length", type=int, default=16, help="length of random tokens")
    p.add_argument("--prefill", type=int, default=5,
                   help="tokens of the first cached forward; the cached steps then run on the input's following "
                        "tokens (default: 5)")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="cached steps after the prefill (default: as many as the tokens allow, at least 1); an "
                        "input shorter than prefill + steps x chunk is extended by the model's greedy continuation")
    p.add_argument("--chunk", type=int, default=1, help="tokens per cached step after the prefill (default: 1)")
    p.add_argument("--atol", type=float, default=0.0, help="allowed max |diff| (default 0: bit-identical)")
    p.add_argument("--rtol", type=float, default=0.0, help="allowed max |diff| relative to each hook's scale")
    p.add_argument("--json", help="write the report(s) as JSON")
    p.add_argument("--plot", help="write a heatmap PNG (one per model and dtype)")
    p.add_argument("--verbose", action="store_true", help="print the full report of every model")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights and random tokens (default: 0)")
    p.add_argument("--experts-implementation", choices=["grouped_mm", "eager"], default=None,
                   help="MoE models: HF's experts implementation, also run by lens_det (default: HF's, grouped_mm)")
    p.add_argument("--attn-implementation", choices=["eager", "sdpa"], default="eager",
                   help="attention implementation the HF reference is built with, and lens_det runs too (default: "
                        "eager, the contract this command has always checked, every hook point including "
                        "hook_attn_scores / hook_pattern). sdpa: HF's sdpa_attention_forward, HF 5's default for "
                        "Gemma 1/3/4; it computes no attention pattern, so those two hooks are not compared. "
                        "Bloom, Gemma 2 and VaultGemma are eager-only (an error when named with --model; left out of "
                        "the default list)")
    p.set_defaults(func=cmd_parity)
    d = sub.add_parser("determinism", help="batch / chunk / cache / run / device invariance, default vs "
                                           "deterministic mode")
    d.add_argument("--model", nargs="*", help="named configs, HF hub names or local dirs (default: the tiny configs)")
    d.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"], choices=list(DTYPES))
    d.add_argument("--length", type=int, default=5, help="prompt length (random token ids)")
    d.add_argument("--threads", type=int, nargs="*", default=[1, 2, 3, 4],
                   help="thread counts compared with the current one (default: 1 2 3 4; none to skip)")
    d.add_argument("--cpu-levels", action="store_true",
                   help="run once per CPU capability level this machine has (default, avx2, avx512), each in a "
                        "fresh process")
    d.add_argument("--audit", action="store_true",
                   help="instead of the model checks, audit every op of the deterministic mode on its own")
    d.add_argument("--seed", type=int, default=0, help="seed of random weights and the prompt (default: 0)")
    d.set_defaults(func=cmd_determinism)
    m = sub.add_parser("models", help="list the named configs (--model takes these, a local directory or a hub id)")
    m.set_defaults(func=cmd_models)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # HF's loading bars would interleave with the tables
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
