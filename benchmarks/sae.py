"""What splicing an SAE into the forward costs beyond the SAE's own matmuls.

On one named config (random weights, no hub access), in one process with interleaved repeats (median of N after
warm-up), under torch.no_grad():
  (a) fwd       the model's forward
  (b) fwd+sae   the same forward with one residual JumpReLU SAE spliced in at a middle layer's hook_resid_post
                (d_sae = expansion * d_model, use_error_term=False: the reconstruction flows on)
  (c) sae       the SAE alone: sae.decode(sae.encode(x)) on that hook's activation (captured once)
and reports overhead = (b - a) / c, the splice's cost relative to the SAE's own work (target <= 1.05), as the
ratio of the medians and as the median of each repeat's (b - a) / c.

    python benchmarks/sae.py [--config mid-gemma3] [--batch 1] [--seq 256] [--expansion 8] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import lens_det
from lens_det.sae import SAE, SAEConfig

TARGET = 1.05


def random_sae(model, hook: str, x: torch.Tensor, expansion: int, seed: int = 0) -> SAE:
    """A JumpReLU SAE with random weights scaled to x: pre-activations about N(0, 1), thresholds in [0.5, 1.5)."""
    d_in = model.config.d_model
    d_sae = expansion * d_in
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook, architecture="jumprelu"), dtype=x.dtype,
              device=x.device)
    gen = torch.Generator().manual_seed(seed)
    std = float(x.float().std())
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / (d_in**0.5 * std))
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=gen) * std / d_sae**0.5)
        sae.b_dec.copy_(0.1 * std * torch.randn(d_in, generator=gen))
        sae.threshold.copy_(0.5 + torch.rand(d_sae, generator=gen))
    return sae


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_cases(cases, args) -> dict[str, list[float]]:
    """cases: {label: (context factory, fn)}; the context (attaching the SAE) is entered outside the timer. Each
    repeat runs every case once, the order rotated per repeat. Returns each case's times in ms, by repeat."""
    labels = list(cases)
    times = {k: [0.0] * args.repeats for k in labels}
    with torch.no_grad():
        for _ in range(args.warmup):
            for k in labels:
                context, fn = cases[k]
                with context():
                    fn()
        for r in range(args.repeats):
            for k in labels[r % len(labels):] + labels[: r % len(labels)]:
                context, fn = cases[k]
                with context():
                    sync(args.device)
                    t0 = time.perf_counter()
                    out = fn()
                    sync(args.device)
                    times[k][r] = (time.perf_counter() - t0) * 1e3
                del out
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mid-gemma3")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * d_model (default 8)")
    p.add_argument("--layer", type=int, default=None, help="the SAE's layer (default n_layers // 2)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per case (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.config not in lens_det.named_configs():
        sys.exit(f"unknown config {args.config!r}; named configs: {', '.join(sorted(lens_det.named_configs()))}")

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1]] + sys.argv))
    load_before = os.getloadavg()
    model = lens_det.from_config(args.config, seed=0, dtype=getattr(torch, args.dtype), device=args.device).eval()
    layer = model.config.n_layers // 2 if args.layer is None else args.layer
    hook = f"blocks.{layer}.hook_resid_post"
    tokens = torch.randint(0, model.config.d_vocab, (args.batch, args.seq), device=args.device,
                           generator=torch.Generator(device=args.device).manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    x = cache[hook]
    sae = random_sae(model, hook, x, args.expansion)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, dtype {args.dtype}, "
          f"{args.config} (d_model {model.config.d_model}, {model.config.n_layers} layers), batch {args.batch} x "
          f"seq {args.seq}; SAE at {hook}: jumprelu, d_sae {sae.cfg.d_sae}, use_error_term=False; median of "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in load_before)}")

    with torch.no_grad():  # sanity: the spliced forward runs the SAE on the captured activation and uses its output
        plain = model(tokens)
        with model.saes([sae], use_error_term=False):
            spliced, spliced_cache = model.run_with_cache(tokens, names_filter=f"{hook}.hook_sae_output")
        direct = sae.decode(sae.encode(x))
        active = (sae.encode(x) > 0).float().sum(-1).mean()
    print(f"spliced hook_sae_output == sae.decode(sae.encode(x)): "
          f"{torch.equal(spliced_cache[f'{hook}.hook_sae_output'], direct)}; logits changed by the splice: "
          f"{not torch.equal(plain, spliced)}; mean active features per token {float(active):.0f} of {sae.cfg.d_sae}")
    del plain, spliced, spliced_cache, direct

    cases = {
        "fwd": (nullcontext, lambda: model(tokens)),
        "fwd+sae": (lambda: model.saes([sae], use_error_term=False), lambda: model(tokens)),
        "sae": (nullcontext, lambda: sae.decode(sae.encode(x))),
    }
    times = time_cases(cases, args)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    per_repeat = [(b - a) / c for a, b, c in zip(times["fwd"], times["fwd+sae"], times["sae"])]
    q1, _, q3 = statistics.quantiles(per_repeat, n=4) if len(per_repeat) > 1 else (per_repeat[0],) * 3
    overhead = (med["fwd+sae"] - med["fwd"]) / med["sae"]
    per_repeat_median = statistics.median(per_repeat)

    print()
    head = ["case", "median ms", "min ms", "max ms", "/ fwd"]
    rows = [[k, f"{med[k]:.1f}", f"{min(times[k]):.1f}", f"{max(times[k]):.1f}", f"{med[k] / med['fwd']:.3f}"]
            for k in cases]
    widths = [max(len(str(v)) for v in col) for col in zip(head, *rows)]
    for r in [head] + rows:
        print("  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print()
    print(f"overhead = (fwd+sae - fwd) / sae: {overhead:.3f} from the medians; per repeat median "
          f"{per_repeat_median:.3f} (quartiles {q1:.3f} .. {q3:.3f}); target <= {TARGET}: "
          f"{'yes' if max(overhead, per_repeat_median) <= TARGET else 'NO'}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in load_after)} (1, 5, 15 min; {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
