"""The `lens-det` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

TINY = ["tiny-bloom", "tiny-bloom-resid", "tiny-gemma", "tiny-gemma2", "tiny-gemma3"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _models(name: str, dtype: torch.dtype, seed: int):
    """(hf_model, lens_model): a named config gets seeded random weights, anything else is loaded."""
    import lens_det
    from lens_det.config import named_configs

    record = named_configs().get(name)
    if record is not None and record.get("hf_name") is None:  # an embedded test config: random weights
        from lens_det.parity.models import random_hf_model

        hf = random_hf_model(name, dtype, seed)
    else:
        from transformers import AutoModelForCausalLM

        source = record["hf_name"] if record else name
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager").eval()
    return hf, lens_det.from_hf_model(hf)


def _tokens(model, batch: int, length: int, padding: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, length), generator=gen)
    mask = torch.ones_like(tokens)
    pad = max(1, length // 4)
    if padding == "left":
        mask[0, :pad] = 0
    elif padding == "right":
        mask[0, -pad:] = 0
    return tokens, mask


def cmd_parity(args) -> int:
    from lens_det.components.positions import positions_from_mask
    from lens_det.parity import compare_cached, compare_hooks

    names = args.model or TINY
    dtypes = [DTYPES[d] for d in args.dtype]
    print(f"lens-det parity: every hook point vs HF eager (transformers), max |diff|; tolerance {args.tol:g}")
    header = f"{'model':<20} {'dtype':<9} {'hooks':>5} {'uncached':>10} {'cached':>10}  {'schedule':<22} result"
    print(header)
    print("-" * len(header))
    failed = False
    for name in names:
        for dtype in dtypes:
            start = time.perf_counter()
            hf, model = _models(name, dtype, args.seed)
            model.set_use_attn_result(True)
            tokens, mask = _tokens(model, args.batch, args.length, args.padding, args.seed)
            positions = positions_from_mask(mask) if model.cfg.positional == "rope" else None
            diffs, missing = compare_hooks(model, hf, tokens, mask, positions)
            steps = compare_cached(model, hf, tokens, mask, positions, prefill=args.prefill, chunk=args.chunk)
            uncached = max(diffs.values())
            cached = max(max(s.values()) for s in steps)
            ok = uncached <= args.tol and cached <= args.tol and not missing
            failed |= not ok
            schedule = f"prefill {args.prefill}, chunk {args.chunk}"
            result = "PASS" if ok else "FAIL" + (f" (no reference: {missing})" if missing else "")
            print(f"{name:<20} {str(dtype).removeprefix('torch.'):<9} {len(diffs) - 1:>5} {uncached:>10.3g} "
                  f"{cached:>10.3g}  {schedule:<22} {result}  [{time.perf_counter() - start:.1f}s]")
    print("all hook points bit-identical" if not failed and args.tol == 0 else
          ("PASS" if not failed else "FAIL: differences over tolerance"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lens-det", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="compare every hook point with the HF reference, cache off and on")
    p.add_argument("--model", nargs="*", help="named configs, HF hub names or local dirs (default: the tiny configs)")
    p.add_argument("--dtype", nargs="*", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--padding", default="left", choices=["left", "right", "none"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--prefill", type=int, default=5)
    p.add_argument("--chunk", type=int, default=1)
    p.add_argument("--tol", type=float, default=0.0, help="max |diff| allowed (default 0.0: bit-identical)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_parity)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
