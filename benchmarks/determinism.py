"""Cost of the deterministic (batch-invariant) mode against the default (HF-exact) mode.

For each named config (random weights), in one process with interleaved repeats (median after a warm-up):
prefill of a left-padded batch (default 4 x 128) and one decode step from the KV cache (the mean over
`--steps` steps), default vs deterministic. Targets: prefill <= 2.0x, decode step <= 1.5x.

    python benchmarks/determinism.py [--configs mid-bloom mid-gemma2 mid-gemma3]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

import lens_det
from lens_det.parity.models import random_hf_model


def prefill_and_decode(model, tokens, mask, steps: int) -> tuple[float, float]:
    cache = model.new_cache()
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(tokens, attention_mask=mask, position_ids="mask", kv_cache=cache, logits_to_keep=1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(logits[:, -1].argmax(-1, keepdim=True), attention_mask=mask, position_ids="mask",
                           kv_cache=cache, logits_to_keep=1)
        return prefill, (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["mid-bloom", "mid-gemma2", "mid-gemma3"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {lens_det.blas_mode()}, {args.dtype}; "
          f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print("| config | prefill default s | prefill deterministic s | ratio (<= 2.0x) | decode step default ms "
          "| decode step deterministic ms | ratio (<= 1.5x) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs:
        model = lens_det.from_hf_model(random_hf_model(name, getattr(torch, args.dtype), std=0.02))
        tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq))
        mask = torch.ones_like(tokens)
        mask[1, :16] = 0
        results = {False: [], True: []}
        for repeat in range(args.repeats + 1):
            for det in (False, True):
                model.deterministic = det
                timing = prefill_and_decode(model, tokens, mask, args.steps)
                if repeat:  # the first round is the warm-up
                    results[det].append(timing)
        model.deterministic = False
        (p0, d0), (p1, d1) = [tuple(statistics.median(t[i] for t in results[m]) for i in (0, 1)) for m in (False, True)]
        print(f"| {name} | {p0:.3f} | {p1:.3f} | {p1 / p0:.2f}x | {1e3 * d0:.1f} | {1e3 * d1:.1f} | {d1 / d0:.2f}x |")


if __name__ == "__main__":
    main()
