"""Activation harvesting: one mid-depth hook over a batch, with stop_at_layer right after it, vs a full HF eager
forward (what you would run to read that activation from HF), in one process with interleaved repeats (median
after a warm-up). Target: <= 0.6x at mid depth. Also prints the same harvest without stop_at_layer.

    python benchmarks/harvest.py [--configs mid-bloom mid-gemma2 mid-gemma3] [--batch 4 --seq 128]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import torch
from generate import timed  # benchmarks/ is on sys.path when a script here runs

import lens_det
from lens_det.parity.models import random_hf_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["mid-bloom", "mid-gemma2", "mid-gemma3"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print("| config | hook | HF full forward s | harvest, stop_at_layer s | ratio (<= 0.6) | harvest, full run s "
          "| ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs:
        hf = random_hf_model(name, std=0.02)
        model = lens_det.from_hf_model(hf)
        layer = model.cfg.n_layers // 2 - 1  # mid depth: half of the blocks run
        hook = f"blocks.{layer}.hook_resid_post"
        tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq))
        mask = torch.ones_like(tokens)
        mask[1, :16] = 0
        cases = {
            "hf": lambda: hf(input_ids=tokens, attention_mask=mask, use_cache=False),
            "stop": lambda: model.run_with_cache(tokens, attention_mask=mask, names_filter=hook,
                                                 stop_at_layer=layer + 1),
            "full": lambda: model.run_with_cache(tokens, attention_mask=mask, names_filter=hook),
        }
        times = {k: [] for k in cases}
        with torch.no_grad():
            _, early = cases["stop"]()
            _, late = cases["full"]()
            assert torch.equal(early[hook], late[hook])  # the harvested activation is the same
            for repeat in range(args.repeats + 1):
                for key, fn in cases.items():
                    t = timed(fn)
                    if repeat:
                        times[key].append(t)
        hf_s, stop_s, full_s = (statistics.median(times[k]) for k in ("hf", "stop", "full"))
        print(f"| {name} | {hook} | {hf_s:.3f} | {stop_s:.3f} | {stop_s / hf_s:.2f}x | {full_s:.3f} | "
              f"{full_s / hf_s:.2f}x |")


if __name__ == "__main__":
    main()
