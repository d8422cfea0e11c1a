"""Generation speed of lens_det vs HF generate (greedy), with and without the KV cache.

For each named config (random weights) it times, in one process with interleaved repeats (median after a
warm-up), a left-padded batch (default 4 x 128 prompt, 128 new tokens, no stop token):
  HF generate(do_sample=False)              vs  lens_det generate (KV cache)     target <= 1.10x
  lens_det generate without the cache           (the cached/uncached speed-up is printed)
It first checks that the greedy tokens of both equal HF's.

    python benchmarks/generate.py [--configs mid-bloom mid-gemma2 mid-gemma3] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM

import lens_det
from lens_det.config import hf_config_from_name


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["mid-bloom", "mid-gemma2", "mid-gemma3"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uncached-repeats", type=int, default=1, help="uncached generation is slow")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    rows = []
    for name in args.configs:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(hf_config_from_name(name), dtype=dtype,
                                              attn_implementation="eager").eval()
        model = lens_det.from_hf_model(hf)
        tokens = torch.randint(1, model.cfg.d_vocab, (args.batch, args.prompt))  # no pad id (0) at the end
        mask = torch.ones_like(tokens)
        mask[1, :16] = 0
        kw = dict(max_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=args.new)
        run_hf = lambda: hf.generate(tokens, attention_mask=mask, **kw)  # noqa: E731
        run_lens = lambda: model.generate(tokens, mask, max_new_tokens=args.new, stop_tokens=[])  # noqa: E731
        run_uncached = lambda: model.generate(tokens, mask, max_new_tokens=args.new, stop_tokens=[],  # noqa: E731
                                              use_kv_cache=False)
        with torch.no_grad():
            same = torch.equal(run_hf(), run_lens().tokens)  # also the warm-up
            print(f"[{name}] greedy tokens equal to HF generate: {same}")
            times = {"hf": [], "lens": []}
            for _ in range(args.repeats):
                times["hf"].append(timed(run_hf))
                times["lens"].append(timed(run_lens))
            uncached = statistics.median(timed(run_uncached) for _ in range(args.uncached_repeats))
        hf_s, lens_s = statistics.median(times["hf"]), statistics.median(times["lens"])
        rows.append((name, hf_s, lens_s, lens_s / hf_s, uncached, uncached / lens_s))
    head = ("config", "HF generate s", "lens_det cached s", "lens_det / HF (<= 1.10)", "lens_det uncached s",
            "cache speed-up")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f}x | {r[4]:.2f} | {r[5]:.1f}x |")
    else:
        print("  ".join(f"{h:>22}" for h in head))
        for r in rows:
            print(f"{r[0]:>22}  {r[1]:>22.2f}  {r[2]:>22.2f}  {r[3]:>21.2f}x  {r[4]:>22.2f}  {r[5]:>21.1f}x")


if __name__ == "__main__":
    main()
