"""Generation with or without the KV cache, mirroring HF `generate` (docs/numerics.md §1.4).

Positions are HF generate's mask-derived ones (cumsum(mask) - 1, pads at 0; ALiBi always uses the mask), the
mask grows by a column of ones each step, and rows that hit a stop token are continued with the pad token.
Given a KV cache, a call runs only the positions the cache does not hold yet (HF's `past_key_values` rule), so
`generate(out.tokens, out.attention_mask, kv_cache=out.kv_cache)` continues `out` as one longer call would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from transformer_lens import ActivationCache

from lens_det.hooks import QUERY_KEY_HOOKS, check_edit, hook_kind, position_dim
from lens_det.inputs import check_tokens, full_mask
from lens_det.kv_cache import KVCache, PendingGeneration


@dataclass
class GenerationOutput:
    tokens: Int[torch.Tensor, "batch pos"]  # the tokens given plus the generated ones
    attention_mask: Int[torch.Tensor, "batch pos"]  # the whole history (with a kv_cache: what it held too)
    logits: list[Float[torch.Tensor, "batch d_vocab"]] = field(default_factory=list)  # raw logits per step
    finished: Bool[torch.Tensor, "batch"] | None = None  # rows that hit a stop token (here or in a continued call)
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


def _check_sampling(max_new_tokens, do_sample: bool, temperature, top_k, top_p, freq_penalty) -> None:
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
    if isinstance(freq_penalty, bool) or not isinstance(freq_penalty, (int, float)) or not freq_penalty >= 0:
        raise ValueError(f"freq_penalty must be a number >= 0 (0 for none), got {freq_penalty!r}")
    knobs = [f"{n}={v!r}" for n, v, unset in (("temperature", temperature, 1.0), ("top_k", top_k, None),
                                              ("top_p", top_p, None), ("freq_penalty", freq_penalty, 0))
             if v != unset]
    if knobs and not do_sample:
        raise ValueError(f"{', '.join(knobs)} only apply when sampling: pass do_sample=True to sample, or drop "
                         "them for greedy decoding")


def _token_ids(name: str, ids, d_vocab: int) -> torch.Tensor:
    """`ids` (an int, a list or a tensor) as a flat long tensor, refused unless every id is in the vocabulary."""
    ids = torch.as_tensor(ids).flatten()
    if ids.numel() and (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool):
        raise TypeError(f"{name} must be integer token ids, got {ids.tolist()}")
    bad = ids[(ids < 0) | (ids >= d_vocab)]
    if bad.numel():
        raise ValueError(f"{name} {bad[0].item()} is outside the vocabulary [0, {d_vocab}); pass token ids from 0 "
                         f"to {d_vocab - 1} (model.cfg.d_vocab = {d_vocab})")
    return ids.long()


def _check_steps(step_hooks: dict) -> None:
    bad = [s for s in step_hooks if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"step_hooks keys are steps, ints >= 0 (0: the prompt's forward, t: the forward that "
                         f"produces generated token t), got {bad[0]!r}")


def _new_tokens(tokens: torch.Tensor, attention_mask, cache: KVCache | None) -> torch.Tensor:
    """The tokens to run: those after what `cache` holds (HF generate with `past_key_values`).

    With a mask (the whole history: what the cache holds plus the new tokens), the tokens are the last positions
    of that history: the whole sequence, only the new tokens, or anything between; those at positions the cache
    holds must be the tokens it holds (at its real positions; pad ids are never read), and are skipped. Without a
    mask, tokens that begin with everything the cache holds are the whole sequence; any other tokens are all new."""
    past, n = (0 if cache is None else cache.length), tokens.shape[1]
    if past == 0 or cache.batch_size != tokens.shape[0]:  # (full_mask refuses another batch size)
        return tokens
    held, real = cache.tokens.to(tokens.device), cache.mask.to(tokens.device).bool()

    def holds(given: torch.Tensor) -> bool:  # the cache's last tokens, at its real positions (pad ids never matter)
        k = given.shape[1]
        return not (real[:, past - k:] & (given != held[:, past - k:])).any()

    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        n_new = attention_mask.shape[1] - past
        if n_new < 1:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions but the cache already holds "
                             f"{past}, so no token is new; pass the mask of the cached positions (cache.mask) "
                             "followed by the new tokens' mask")
    elif n >= past and holds(tokens[:, :past]):
        n_new = n - past
        if n_new == 0:
            raise ValueError(f"the cache already holds these {n} tokens, so none is new; pass the tokens that follow "
                             "them (to run them once more after the history, pass attention_mask=torch.cat("
                             "[cache.mask, torch.ones_like(tokens)], 1))")
    else:
        return tokens
    n_held = n - n_new
    if n_held <= 0:  # only new tokens (a mask longer than cache + tokens: full_mask says what to pass)
        return tokens
    if n_held > past:
        raise ValueError(f"tokens have {n} positions but attention_mask covers only {past + n_new}; pass the mask "
                         "of every position: cache.mask followed by the new tokens' mask")
    if not holds(tokens[:, :n_held]):
        raise ValueError(f"attention_mask covers {past + n_new} positions and the cache holds {past}, so the first "
                         f"{n_held} of the {n} tokens are cached positions, but they differ from the tokens the "
                         "cache holds (cache.tokens); pass the sequence the cache was built from followed by the "
                         "new tokens, or only the new tokens with a mask of cache.length + their number")
    return tokens[:, n_held:]


def _resumed_finished(cache: KVCache | None, new_input: torch.Tensor) -> torch.Tensor:
    """The rows already finished: those of the generate call this one continues (it runs exactly the tokens that
    call left pending), else none."""
    pending = None if cache is None else cache.pending
    if pending is not None and torch.equal(new_input, pending.tokens.to(new_input.device)):
        return pending.finished.to(new_input.device).clone()
    return torch.zeros(new_input.shape[0], dtype=torch.bool, device=new_input.device)


def _first_key(model: Any, name: str, start: int) -> int:
    """The first key a cached forward whose new positions begin at `start` attends to in the layer of hook `name`:
    a sliding-window layer's cache keeps the last window - 1 positions (KVCacheEntry.commit), a full one all."""
    layer = int(name.split(".")[1])
    if model.config.layer_types[layer] != "sliding_attention":
        return 0
    return max(0, start - model.config.sliding_window + 1)


class _StepRecorder:
    """generate(return_activations="steps"): each forward's last `n_new` positions of every recorded hook. Score /
    pattern hooks are left out: their key axis is each step's keys (a sliding-window layer's cache holds the window
    only), so the rows of different steps share no key axis."""

    def __init__(self, model, names_filter):
        names = [names_filter] if isinstance(names_filter, str) else names_filter
        if names is not None and not callable(names):
            names = list(names)
            unknown = [n for n in names if n not in model.hook_dict]
            if unknown:
                raise ValueError(f"names_filter names {unknown}, which are no hook points of this model")
            qk = [n for n in names if hook_kind(n).key_axis is not None]
            if qk:
                raise ValueError(f"return_activations='steps' records no score / pattern hooks ({qk}): their key "
                                 "axis differs from step to step; use return_activations=True for them")
        self.accept = (lambda name: name in names) if isinstance(names, list) else names or (lambda name: True)
        self.n_new = 0
        self.parts: dict[str, list[torch.Tensor]] = {}

    def wants(self, name: str) -> bool:
        return not name.endswith(QUERY_KEY_HOOKS) and self.accept(name)

    def hook(self, act: torch.Tensor, hook) -> None:
        dim = position_dim(hook.name)
        self.parts.setdefault(hook.name, []).append(act.narrow(dim, act.shape[dim] - self.n_new, self.n_new).clone())

    def stacked(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts, dim=position_dim(name)) for name, parts in self.parts.items()}


def _on_positions(model: Any, fn, start: int, stop: int):
    """`fn` as a hook that runs on the absolute positions [start, stop) only, what it gets at that step with the
    cache: the slice of those positions, `model.query_start` = its first position, and for scores / patterns the
    keys that cached step attends to. Its edit (returned or in place) lands on those positions only."""
    def on_positions(act: torch.Tensor, hook):
        dim, first = position_dim(hook.name), model.query_start
        lo, hi = max(start, first), min(stop, first + act.shape[dim])
        if lo >= hi:  # none of them is computed in this forward (the cut tail of KV-sharing layers)
            return None
        index: list[slice] = [slice(None)] * act.ndim
        index[dim] = slice(lo - first, hi - first)
        if dim == 2:  # uncached, the key axis is every position [0, total)
            index[3] = slice(_first_key(model, hook.name, start), hi)
        part = act[tuple(index)]
        model.query_start = lo  # what patching.patch_hook reads
        try:
            edited = fn(part, hook=hook)
        finally:
            model.query_start = first
        if edited is None or edited is part:  # an in-place edit of the view is already in `act`
            return None
        check_edit(hook.name, part, edited)  # what HookPoint refuses, checked on the slice the hook was given
        act = act.clone()
        act[tuple(index)] = edited
        return act
    return on_positions


def generate(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"] | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    freq_penalty: float = 0.0,
    generator: torch.Generator | None = None,
    stop_tokens: int | list[int] | None = None,
    pad_token_id: int | None = None,
    use_kv_cache: bool = True,
    kv_cache: KVCache | None = None,
    fwd_hooks: list | tuple = (),
    step_hooks: dict[int, list] | None = None,
    return_cache: bool = False,
    return_activations: bool | str = False,
    names_filter=None,
    verbose: bool = False,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` tokens for a (left-padded) batch.

    Args:
        tokens, attention_mask: the prompt [batch, pos] and its 0/1 mask (left padding, as HF generate).
        max_new_tokens: an int >= 1.
        do_sample: greedy when False (the default, as in HF generate; TransformerLens 2.x samples by default);
            otherwise sample from softmax(logits / temperature) after top-k/top-p, with `generator` for reproducible
            draws. Passing temperature, top_k, top_p or freq_penalty without do_sample=True raises instead of being
            silently greedy.
        freq_penalty: TransformerLens 2.x's (`utils.sample_logits`): the sampling scores are logits / temperature
            - freq_penalty * (how often each id occurs in the sequence so far: the prompt, a kv_cache's history,
            the generated tokens), before top-k / top-p. A sampling knob, as there (TransformerLens ignores it when
            greedy). Left pads (mask 0) are not counted; TransformerLens counts the pad ids of its padded batch.
        stop_tokens: token id(s) that end a row (default: the config's eos_token_id); finished rows continue
            with `pad_token_id` (default: the config's, else the first stop token), like HF generate, and
            generation stops when every row has finished. Ids outside the vocabulary are refused.
        use_kv_cache: decode one token per step from the cache, or re-run the whole sequence each step.
        kv_cache: continue from an existing cache, HF generate's `past_key_values` way: only the positions the
            cache does not hold yet run. `attention_mask` then covers the whole history (what the cache holds plus
            the new tokens), and `tokens` are the last positions of it: the whole sequence (HF's way, e.g.
            `out.tokens` with `out.attention_mask` of a call with return_cache=True), only the new tokens, or
            anything between; tokens at cached positions must be the ones the cache holds (`cache.tokens`).
            Without a mask, tokens that begin with everything the cache holds are the whole sequence, other tokens
            are all new, and the mask is the cache's followed by ones (to run a copy of the history again, pass the
            mask). A call that runs exactly the tokens a generate call left pending (its last generated ones)
            continues that call: its finished rows stay finished, so two calls equal one call. The returned
            `tokens` are the given ones plus the generated ones (HF's `sequences`), `attention_mask` the whole
            history.
        fwd_hooks: (name, fn) pairs active during every forward: with the cache on the new positions, without it
            on every position (so a position-wise edit means the same either way).
        step_hooks: {step: [(name, fn)]}: step t's hooks edit the positions that are new at step t (0: the
            prompt's forward, whose positions are the prompt; t > 0: the forward that produces generated token t,
            whose one new position holds generated token t - 1), and the edit persists because later positions
            read it. With the cache they run at step t only and what they change is stored in the keys and values;
            without it every later forward recomputes those positions, so step t's hooks run again at every later
            step, on those positions only. Either way a hook gets the same tensor: those positions (for scores /
            patterns, the keys the cached step attends to) with `model.query_start` = their first absolute index,
            so lens_det.patching.patch_hook works in both.
        return_cache: return the final KVCache.
        return_activations: True: an ActivationCache of one uncached forward over the final sequence (with
            `fwd_hooks` active), i.e. every hook over the whole generated text, recomputed. "steps": the
            activations the generating forwards computed (after every hook's edit: fwd_hooks, step_hooks, spliced
            SAEs), each step's new positions concatenated along the position axis: the prompt, then each generated
            token but the last (which no forward has read). With the cache that is what each cached step computed;
            without it, each step's new positions of that step's forward. Score / pattern hooks are not recorded
            (each step has its own key axis; a sliding-window layer's cache holds the window only). Refused on a
            model whose last layers share KV (their prompt step computes the last position only).
        names_filter: with return_activations, which hooks to keep (a name, a list of names or a predicate on
            names; default every hook that fires).
        verbose: show a progress bar.
    """
    _check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, freq_penalty)
    if kv_cache is not None and not use_kv_cache:
        raise ValueError("kv_cache was given but use_kv_cache=False; drop one of them")
    if kv_cache is not None and (return_activations or kv_cache.frozen):
        raise ValueError("continuing from a kv_cache supports neither return_activations nor a frozen cache "
                         "(generation must grow it); clone() a frozen prefix first")
    if return_activations not in (False, True, "steps"):
        raise ValueError(f"return_activations must be False, True or 'steps', got {return_activations!r}")
    if return_activations == "steps" and model.kv_consumer_tail is not None:
        raise NotImplementedError("return_activations='steps' on a model whose last layers share KV: their prompt "
                                  "forward computes the last position only, so the steps hold no activations for "
                                  "the other prompt positions; use return_activations=True (one forward over the "
                                  "final sequence)")
    step_hooks = step_hooks or {}
    _check_steps(step_hooks)
    tokens = check_tokens(model, tokens)
    batch, device, d_vocab = tokens.shape[0], tokens.device, model.cfg.d_vocab
    stops = model.cfg.eos_token_id
    if stop_tokens is not None:
        stops = _token_ids("stop token (stop_tokens / eos_token_id)", stop_tokens, d_vocab)
    stops = torch.as_tensor([] if stops is None else stops, dtype=torch.long, device=device).flatten()
    pad = model.cfg.pad_token_id
    if pad_token_id is not None:
        pad = _token_ids("pad_token_id", pad_token_id, d_vocab)
        if pad.numel() != 1:
            raise TypeError(f"pad_token_id must be one token id, got {pad.tolist()}")
        pad = int(pad)
    if pad is None and stops.numel():
        pad = int(stops[0])
    cache = (kv_cache if kv_cache is not None else model.new_cache()) if use_kv_cache else None
    new_input = _new_tokens(tokens, attention_mask, cache)
    mask = full_mask(model, new_input, attention_mask, cache)  # validated; None: cached mask + ones
    past = 0 if cache is None else cache.length
    finished = _resumed_finished(cache, new_input)
    if finished.any() and pad is None:
        raise ValueError(f"row(s) {finished.nonzero().flatten().tolist()} finished in the generate call this one "
                         "continues and get the pad token, but there is none (no pad_token_id, no stop_tokens, none "
                         "in the config); pass pad_token_id=")
    counts = None
    if freq_penalty:
        history = new_input if past == 0 else torch.cat([cache.tokens.to(device), new_input], 1)
        counts = torch.zeros(batch, d_vocab, device=device).scatter_add_(1, history, mask.float())
    out = GenerationOutput(tokens, mask)
    sequence, n_prompt = tokens, new_input.shape[1]

    def new_positions(step: int) -> tuple[int, int]:  # uncached (so no cached history): the prompt starts at 0
        return (0, n_prompt) if step == 0 else (n_prompt + step - 1, n_prompt + step)

    def hooks_at(step: int) -> list:
        if cache is not None:
            return list(step_hooks.get(step, ()))
        return [(name, _on_positions(model, fn, *new_positions(s)))
                for s in sorted(step_hooks) if s <= step for name, fn in step_hooks[s]]

    recorder = _StepRecorder(model, names_filter) if return_activations == "steps" else None
    steps = range(max_new_tokens)
    if verbose:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate")
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        for step in steps:
            if finished.all():
                break
            recording = [(recorder.wants, recorder.hook)] if recorder is not None else []
            if recorder is not None:
                recorder.n_new = new_input.shape[1]  # what is new in this forward (uncached too: the prompt, then 1)
            with model.hooks(fwd_hooks=hooks_at(step) + recording):
                if cache is None:
                    logits = model(sequence, attention_mask=mask, position_ids="mask", logits_to_keep=1)
                else:
                    logits = model(new_input, attention_mask=mask, position_ids="mask", kv_cache=cache,
                                   logits_to_keep=1)
            last = logits[:, -1]
            out.logits.append(last)
            if do_sample:
                scores = last.float() / temperature
                if counts is not None:
                    scores = scores - freq_penalty * counts
                probs = filter_logits(scores, top_k, top_p).softmax(-1)
                next_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                next_token = last.argmax(-1)
            if finished.any():
                next_token = next_token.masked_fill(finished, pad)
            finished |= torch.isin(next_token, stops)
            new_input = next_token[:, None]
            if counts is not None:
                counts.scatter_add_(1, new_input, torch.ones_like(new_input, dtype=counts.dtype))
            sequence = torch.cat([sequence, new_input], dim=1)
            mask = torch.cat([mask, torch.ones_like(new_input)], dim=1)
    out.tokens, out.attention_mask, out.finished = sequence, mask, finished
    if cache is not None:
        cache.pending = PendingGeneration(sequence[:, -1:], finished.clone())
    if return_cache:
        out.kv_cache = cache
    if recorder is not None:
        from lens_det.tl.activation_cache import LensActivationCache

        out.activations = LensActivationCache(recorder.stacked(), model, has_batch_dim=True)
    elif return_activations:
        with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
            _, out.activations = model.run_with_cache(sequence, attention_mask=mask, position_ids="mask")
    return out
