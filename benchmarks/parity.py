"""Cost of a parity report: `lens_det.parity.compare` vs running both models over the same schedule.

Target: a report for a mid-size config (8 layers) with a 64-token prompt and 16 decode steps takes at most 5x
the time of running lens_det and HF over that schedule (uncached once, then the cached prefill + steps).

    python benchmarks/parity.py [--configs mid-bloom mid-gemma2 mid-gemma3] [--prompt 64] [--decode-steps 16]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import lens_det
from lens_det.config import hf_config_from_name
from lens_det.parity import Schedule, compare


def run_both(model, hf, tokens, mask, schedule: Schedule) -> None:
    """What a user would run anyway: both models uncached, then both cached over the schedule."""
    n = schedule.length
    with torch.no_grad():
        model(tokens[:, :n], attention_mask=mask[:, :n])
        hf(tokens[:, :n], attention_mask=mask[:, :n], use_cache=False)
        cache, hf_cache = model.new_cache(), DynamicCache(config=hf.config)
        for a, b in schedule.bounds():
            model(tokens[:, a:b], attention_mask=mask[:, :b], kv_cache=cache)
            hf(tokens[:, a:b], attention_mask=mask[:, :b], past_key_values=hf_cache, use_cache=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["mid-bloom", "mid-gemma2", "mid-gemma3"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print("| config | run both models s | compare() s | ratio (<= 5x) | result |")
    print("|---|---|---|---|---|")
    for name in args.configs:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(hf_config_from_name(name), attn_implementation="eager").eval()
        model = lens_det.from_hf_model(hf)
        schedule = Schedule(args.prompt, args.decode_steps, 1)
        tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, schedule.length))
        mask = torch.ones_like(tokens)
        mask[0, :8] = 0
        plain, checked, report = [], [], None
        run_both(model, hf, tokens, mask, schedule)  # warm-up
        for _ in range(args.repeats):
            start = time.perf_counter()
            run_both(model, hf, tokens, mask, schedule)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            report = compare(model, hf, tokens, mask, schedule=schedule)
            checked.append(time.perf_counter() - start)
        a, b = statistics.median(plain), statistics.median(checked)
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {'PASS' if report.passed else 'FAIL'} |")


if __name__ == "__main__":
    main()
