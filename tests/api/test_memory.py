"""Peak memory of a forward against HF's: lens_det must not keep tensors alive that HF's forward frees.

Measured as bytes live in torch's CPU allocator (torch.profiler's allocation events), not process RSS: the allocator
sees every tensor, and its counts are exact and repeatable (the same shapes allocate the same bytes), so the
comparison is a number, not a timing. At the 2048-token prompt of gemma-3-1b's first two layers this matches HF
sdpa to 0.2 MiB of 105 MiB (benchmarks/longctx.py measures RSS at full size)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lens_det
from lens_det.config import hf_config_from_name
from lens_det.parity.models import random_hf_model_from_config


def peak_allocated_bytes(fn) -> int:
    """The most bytes live at once in the CPU allocator while fn() runs, counted from what fn() allocates."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma3", "tiny-gemma4-ple"])
def test_forward_peak_memory_is_hf_s(name):
    """Under sdpa the MLP is the peak of a long prompt (as at real sizes: d_mlp = 6912 against 1152 for gemma-3-1b),
    so the tiny config gets a wide MLP; any residual-sized tensor held through it shows."""
    config = hf_config_from_name(name)
    config.intermediate_size = 32 * config.hidden_size
    hf = random_hf_model_from_config(config, torch.float32, attn_implementation="sdpa")
    model = lens_det.from_hf_model(hf)
    assert model.attn_implementation == "sdpa"
    tokens = torch.randint(0, config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(tokens[:, :8]), hf(input_ids=tokens[:, :8])  # first-call allocations (caches, lazy tables) out
        ours = peak_allocated_bytes(lambda: model(tokens, logits_to_keep=1))
        theirs = peak_allocated_bytes(lambda: hf(input_ids=tokens, use_cache=False, logits_to_keep=1))
    activation = tokens.shape[1] * config.hidden_size * 4  # one [1, T, d_model] fp32 tensor
    # Tolerance: a quarter of one residual-sized activation (lens_det builds its masks and positions its own way;
    # anything kept alive that HF frees is a whole activation or more).
    assert ours <= theirs + activation // 4, (ours / activation, theirs / activation)
