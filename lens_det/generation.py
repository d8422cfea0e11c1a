"""Generation with or without the KV cache, mirroring HF `generate` (docs/numerics.md §1.4).

Positions are HF generate's mask-derived ones (cumsum(mask) - 1, pads at 0; ALiBi always uses the mask), the
mask grows by a column of ones each step, and rows that hit a stop token are continued with the pad token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from transformer_lens import ActivationCache

from lens_det.kv_cache import KVCache


@dataclass
class GenerationOutput:
    tokens: Int[torch.Tensor, "batch pos"]  # prompt plus generated tokens
    attention_mask: Int[torch.Tensor, "batch pos"]
    logits: list[Float[torch.Tensor, "batch d_vocab"]] = field(default_factory=list)  # raw logits per step
    kv_cache: KVCache | None = None
    activations: ActivationCache | None = None


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering as HF's warpers do; removed entries become -inf."""
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _check_sampling(max_new_tokens, do_sample: bool, temperature, top_k, top_p) -> None:
    """HF generate's rules, plus: sampling knobs without do_sample=True are an error, not silently greedy."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}; for greedy decoding leave "
                         "do_sample=False")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 (or None for no top-k filtering), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None for no nucleus filtering), got {top_p!r}")
    knobs = [f"{n}={v!r}" for n, v, unset in (("temperature", temperature, 1.0), ("top_k", top_k, None),
                                              ("top_p", top_p, None)) if v != unset]
    if knobs and not do_sample:
        raise ValueError(f"{', '.join(knobs)} only apply when sampling: pass do_sample=True to sample, or drop "
                         "them for greedy decoding")


def generate(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_tokens: int | list[int] | None = None,
    pad_token_id: int | None = None,
    use_kv_cache: bool = True,
    kv_cache: KVCache | None = None,
    fwd_hooks: list | tuple = (),
    step_hooks: dict[int, list] | None = None,
    return_cache: bool = False,
    return_activations: bool = False,
    verbose: bool = False,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` tokens for a (left-padded) batch.

    Args:
        tokens, attention_mask: the prompt [batch, pos] and its 0/1 mask (left padding, as HF generate).
        max_new_tokens: an int >= 1.
        do_sample: greedy when False (the default, as in HF generate; TransformerLens 2.x samples by default); otherwise sample from
            softmax(logits / temperature) after top-k/top-p, with `generator` for reproducible draws. Passing
            temperature, top_k or top_p without do_sample=True raises instead of being silently greedy.
        stop_tokens: token id(s) that end a row (default: the config's eos_token_id); finished rows continue
            with `pad_token_id`, like HF generate, and generation stops when every row has finished.
        use_kv_cache: decode one token per step from the cache, or re-run the whole sequence each step.
        kv_cache: continue from an existing cache (it must hold exactly the tokens before `tokens`; the
            mask then covers the cached tokens too, and the returned `attention_mask` is the whole history while
            `tokens` holds this call's tokens plus the generated ones).
        fwd_hooks: (name, fn) pairs active during every step (with the cache they see the new positions only).
        step_hooks: {step: [(name, fn)]} active only at that step (0: the prompt's forward; t: the forward that
            produces generated token t). Use lens_det.patching.patch_hook for position-aware patches.
        return_cache: return the final KVCache.
        return_activations: return an ActivationCache of one uncached forward over the final sequence (with
            `fwd_hooks` active), i.e. every hook over the whole generated text.
        verbose: show a progress bar.
    """
    _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    if kv_cache is not None and not use_kv_cache:
        raise ValueError("kv_cache was given but use_kv_cache=False; drop one of them")
    if kv_cache is not None and (return_activations or kv_cache.frozen):
        raise ValueError("continuing from a kv_cache supports neither return_activations nor a frozen cache "
                         "(generation must grow it); clone() a frozen prefix first")
    tokens = model._check_tokens(tokens)
    batch = tokens.shape[0]
    device = tokens.device
    mask = model._full_mask(tokens, attention_mask, kv_cache)  # validated; None: cached mask + ones
    stops = model.cfg.eos_token_id if stop_tokens is None else stop_tokens
    stops = torch.as_tensor([] if stops is None else stops, dtype=torch.long, device=device).flatten()
    pad = model.cfg.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None and stops.numel():
        pad = int(stops[0])
    cache = (kv_cache if kv_cache is not None else model.new_cache()) if use_kv_cache else None
    out = GenerationOutput(tokens, mask)
    sequence, new_input = tokens, tokens
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = range(max_new_tokens)
    if verbose:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate")
    step_hooks = step_hooks or {}
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for step in steps:
            with model.hooks(fwd_hooks=list(step_hooks.get(step, ()))):
                if cache is None:
                    logits = model(sequence, attention_mask=mask, position_ids="mask", logits_to_keep=1)
                else:
                    logits = model(new_input, attention_mask=mask, position_ids="mask", kv_cache=cache,
                                   logits_to_keep=1)
            last = logits[:, -1]
            out.logits.append(last)
            if do_sample:
                probs = filter_logits(last.float() / temperature, top_k, top_p).softmax(-1)
                next_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                next_token = last.argmax(-1)
            if stops.numel():
                next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
                finished |= torch.isin(next_token, stops)
            new_input = next_token[:, None]
            sequence = torch.cat([sequence, new_input], dim=1)
            mask = torch.cat([mask, torch.ones_like(new_input)], dim=1)
            if stops.numel() and finished.all():
                break
    out.tokens, out.attention_mask = sequence, mask
    if return_cache:
        out.kv_cache = cache
    if return_activations:
        with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
            _, out.activations = model.run_with_cache(sequence, attention_mask=mask, position_ids="mask")
    return out
