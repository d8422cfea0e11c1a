"""compare (lens_det vs HF, cache off and on), self_parity (lens_det cached vs uncached) and assert_parity."""

from __future__ import annotations

from typing import Any

import torch

from lens_det import ops
from lens_det.hf import hf_attn_implementation, hf_class_name
from lens_det.inputs import check_binary_mask, check_tokens, resolve_positions
from lens_det.parity.reference import capture_reference
from lens_det.parity.report import ParityReport, Schedule, diff_hook, kind_of
from lens_det.weight_processing import changed_hooks
from lens_det.hooks import QUERY_KEY_HOOKS, hook_kind

# The pattern hooks (QUERY_KEY_HOOKS) have no value under sdpa (it returns z only): compared under eager, listed as
# not compared under sdpa. Requesting them would make those layers run eager attention (components/attention.py).
SDPA_NOT_COMPARED = "sdpa computes no attention pattern (a hook on it runs that layer eagerly)"


def prepare_inputs(model, tokens, attention_mask, position_ids, schedule, prefill, decode_steps, chunk):
    """Validate everything before any compute; return (tokens, mask, positions tensor or None, schedule)."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError("tokens must be a [batch, pos] tensor of token ids")
    tokens = check_tokens(model, tokens)
    mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
    if mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but tokens have {tuple(tokens.shape)}; "
                         "pass one 0/1 entry per token")
    check_binary_mask(mask)
    schedule = schedule or Schedule.fit(tokens.shape[1], prefill, decode_steps, chunk)
    if schedule.length > tokens.shape[1]:
        raise ValueError(f"the schedule needs {schedule.length} tokens but only {tokens.shape[1]} were given")
    n = schedule.length
    tokens, mask = tokens[:, :n], mask[:, :n].long()
    if isinstance(position_ids, torch.Tensor) and model.cfg.positional != "alibi":  # ALiBi ignores them
        if position_ids.shape[-1] < n:
            raise ValueError(f"position_ids cover {position_ids.shape[-1]} positions but the schedule needs {n}")
        position_ids = position_ids[:, :n]
    # None: both models then use arange from the cache offset (HF forward's default)
    positions = resolve_positions(position_ids, mask, 0, n, model.cfg.positional)
    return tokens, mask, positions, schedule


def _slice(positions, a, b):
    return None if positions is None else positions[:, a:b]


def compare(
    model: Any,
    hf_model: Any,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | str | None = None,
    schedule: Schedule | None = None,
    prefill: int | None = None,
    decode_steps: int | None = None,
    chunk: int = 1,
    atol: float = 0.0,
    rtol: float = 0.0,
    title: str | None = None,
) -> ParityReport:
    """Every hook point of `model` against the HF reference `hf_model`, without a cache over the schedule's tokens
    and with both caches on the schedule (prefill, then decode steps of `chunk`). Only the decode steps read the
    caches: a schedule without any (prefill = all the tokens) leaves them unchecked, which the report states
    (`report.decode_steps_compared` is 0, and its text says so).

    Both models must run the same attention implementation (`model.attn_implementation` and the HF model's
    `config._attn_implementation`, "eager" or "sdpa"; they round differently), the same dtype and the same weights,
    and the HF model must be in eval mode: each is checked first, with a ValueError naming the cause. Under "sdpa"
    there is no attention pattern: hook_attn_scores / hook_pattern are left out of lens_det's run (hooking them would
    make those layers run eager) and listed in `report.not_compared`.

    Default tolerance 0.0: lens_det's contract is bit-identity with HF (eager or sdpa, whichever both run). A model
    with processed weights (`model.processing`, e.g. fold_ln) needs a tolerance, and its hooks whose meaning the
    processing changed are listed in `report.not_compared` instead of compared (after center_unembed, log-probs
    replace logits). `position_ids` (RoPE models): None (HF forward's arange), "mask" (HF generate's), or a tensor;
    both models get the same positions.
    """
    from transformers import DynamicCache

    from lens_det.config import LensConfig

    _check_architecture(model.config, LensConfig.from_hf_config(hf_model.config))
    if getattr(model, "acts_to_saes", None):
        raise ValueError(f"SAEs are spliced in at {sorted(model.acts_to_saes)}: HF has no counterpart of their hooks "
                         "(and without the error term the model is no longer HF's); compare without them "
                         "(model.reset_saes(), or outside `with model.saes(...)`)")
    implementation = _check_attn_implementation(model, hf_model)
    _check_experts_implementation(model, hf_model)
    _check_dtype(model, hf_model)
    if hf_model.training:
        raise ValueError("the HF model is in training mode (hf_model.training is True), so its dropout layers drop "
                         "activations at random: call hf_model.eval() before comparing")
    processing = tuple(getattr(model, "processing", ()))
    if processing and atol == 0 == rtol:
        raise ValueError(f"the model's weights were processed ({', '.join(processing)}), so it equals HF up to float "
                         "rounding, not bit for bit: pass a tolerance, e.g. compare(..., rtol=1e-5)")
    tokens, mask, positions, schedule = prepare_inputs(model, tokens, attention_mask, position_ids, schedule,
                                                 prefill, decode_steps, chunk)
    if not processing:  # processed weights differ from HF's by design
        _check_weights(model, hf_model)
    report = ParityReport(title or f"lens_det vs HF {type(hf_model).__name__} ({model.cfg.dtype}, {implementation} "
                          "attention)", schedule, atol, rtol, processing=processing,
                          attn_implementation=implementation)
    changed = changed_hooks(processing)  # hook kind -> the step after which HF has no counterpart
    with_result = model.blocks[0].attn.use_attn_result
    names_filter = _sdpa_filter(model, report)

    def run(step, a, b, cache, hf_cache):
        with torch.no_grad():
            logits, ours = model.run_with_cache(tokens[:, a:b], attention_mask=mask[:, :b],
                                                position_ids=_slice(positions, a, b), kv_cache=cache,
                                                names_filter=names_filter)
        ref_logits, reference = capture_reference(hf_model, model.config, tokens[:, a:b], mask[:, :b],
                                                  _slice(positions, a, b), past_key_values=hf_cache,
                                                  with_result=with_result)
        for hook in ours.keys():  # firing order, so the first failing row is the first divergence
            if kind_of(hook) in changed:
                report.not_compared[hook] = f"changed by {changed[kind_of(hook)]}"
            elif hook in reference:
                report.rows.append(diff_hook(step, hook, ours[hook], reference[hook], atol, rtol, a))
            else:
                report.missing[hook] = "no HF reference captured"
        if "logits" in changed:  # center_unembed shifts each position's logits: the log-probs are what is kept
            report.not_compared["logits"] = f"changed by {changed['logits']}; log_probs compared instead"
            report.rows.append(diff_hook(step, "log_probs", logits.float().log_softmax(-1),
                                         ref_logits.float().log_softmax(-1), atol, rtol, a))
        else:
            report.rows.append(diff_hook(step, "logits", logits, ref_logits, atol, rtol, a))
        return len(ours.keys())

    report.n_hooks = run("uncached", 0, schedule.length, None, None)
    cache, hf_cache = model.new_cache(), DynamicCache(config=hf_model.config)
    for i, (a, b) in enumerate(schedule.bounds()):
        run(f"cached:{i}", a, b, cache, hf_cache)
    return report


def _check_architecture(ours: Any, theirs: Any) -> None:
    """Both configs must convert to the same LensConfig, the HF class included. The class is compared as the one
    `hf_architecture` names, where None (a config built in code has no `architectures` until save_pretrained fills
    it in) names the family's causal LM: that bookkeeping, like the config's transformers_version, _name_or_path or
    dtype (which no LensConfig field reads), refuses nothing."""
    diff = {k: (v, getattr(theirs, k)) for k, v in ours.to_dict().items()
            if k != "hf_architecture" and getattr(theirs, k) != v}
    if hf_class_name(ours) != hf_class_name(theirs):
        diff["hf_architecture"] = (hf_class_name(ours), hf_class_name(theirs))
    if diff:
        raise ValueError(f"the HF model has a different architecture or vocabulary than the lens_det model: {diff} "
                         "(lens_det's value, the HF model's); compare a lens_det model with the HF model it was "
                         "converted from, or convert this one: lens_det.from_hf_model(hf_model)")


def _check_attn_implementation(model: Any, hf_model: Any) -> str:
    """Both sides must run the same attention implementation: eager and sdpa round differently (and differ on fully
    padded query rows), so a mismatch would read as a FAIL at the first attention layer. Returns it."""
    from lens_det.convert import sdpa_refusal

    theirs, ours = hf_attn_implementation(hf_model), getattr(model, "attn_implementation", "eager")
    if theirs != ours:
        why = sdpa_refusal(model.config) if theirs == "sdpa" else None
        fix = (f"rebuild the HF model with attn_implementation={ours!r} (lens_det cannot run sdpa for it: {why})"
               if why else f"set model.attn_implementation = {theirs!r}, or rebuild the HF model with "
                           f"attn_implementation={ours!r}")
        raise ValueError(f"the HF model runs attn_implementation={theirs!r} and the lens_det model {ours!r}; the two "
                         f"round differently, so they are not compared: {fix}")
    return ours


def _check_dtype(model: Any, hf_model: Any) -> None:
    """Both sides must hold their weights in the same dtype: every op rounds in its input dtype."""
    theirs = next(hf_model.parameters()).dtype
    ours = model.cfg.dtype
    if theirs != ours:
        raise ValueError(f"the HF model's parameters are {theirs} and the lens_det model's {ours}; every op rounds in "
                         f"its dtype, so they are not compared: convert the HF model with "
                         f"lens_det.from_hf_model(hf_model) (it follows the HF model's dtype), or load the HF model in "
                         f"{ours} (from_pretrained(..., dtype={ours}); hf_model.to({ours}) also casts its RoPE tables, "
                         "which from_pretrained keeps in float32, docs/numerics.md §3.4)")


def _check_weights(model: Any, hf_model: Any) -> None:
    """Both sides must hold the same weights: the HF model's state dict, converted as from_hf_model converts it
    (lens_det.convert, sharing storage where it can), must equal the lens_det model's, tensor by tensor."""
    from lens_det.convert import family_for

    family = family_for(hf_model.config)
    dtype = next(hf_model.parameters()).dtype  # what from_hf_model casts to
    converted = family.state_dict_from_hf(hf_model.state_dict(), family.config_from_hf(hf_model.config))
    for name, ours in model.state_dict().items():
        theirs = converted.get(name)
        if theirs is None or ours.is_meta or theirs.is_meta:  # meta: offloaded (accelerate), no data here to read
            continue
        theirs = theirs.to(device=ours.device, dtype=dtype)
        if ours.shape != theirs.shape or ours.dtype != theirs.dtype or not _same(ours, theirs):
            detail = (f"max |diff| {(ours.double() - theirs.double()).abs().max().item():.3g}"
                      if ours.shape == theirs.shape else f"shape {tuple(ours.shape)} vs {tuple(theirs.shape)}")
            raise ValueError(f"the lens_det model's weights differ from the HF model's (first differing parameter: "
                             f"{name}, {detail}); one was edited or they come from different checkpoints or "
                             "seeds, so they are not compared: convert the HF model again with "
                             "lens_det.from_hf_model(hf_model)")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal tensors of one shape and dtype, NaN equal to NaN."""
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _check_experts_implementation(model: Any, hf_model: Any) -> None:
    """MoE models: HF's experts implementations round differently, so both sides must run the same one."""
    from lens_det.hf import hf_experts_implementation

    if not model.config.n_experts:
        return
    theirs, ours = hf_experts_implementation(hf_model), model.experts_implementation
    if theirs != ours:
        raise ValueError(f"the HF model runs experts_implementation={theirs!r} and the lens_det model {ours!r}; "
                         f"they round differently: set model.experts_implementation = {theirs!r} (or build the HF "
                         f"model with experts_implementation={ours!r})")


def self_parity(
    model: Any,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | str | None = "mask",
    schedule: Schedule | None = None,
    prefill: int | None = None,
    decode_steps: int | None = None,
    chunk: int = 1,
    atol: float = 0.0,
    rtol: float = 1e-4,
) -> ParityReport:
    """lens_det with its KV cache on the schedule vs lens_det without a cache, hook by hook (no HF needed).

    In the default (HF-exact) mode the two differ by float rounding (prefill and decode multiply matrices of
    different shapes), hence the default rtol 1e-4 of each hook's scale; pass rtol=0 in deterministic mode.
    Left-pad query positions are excluded (a fully masked row spreads evenly over whatever keys are present).
    """
    tokens, mask, positions, schedule = prepare_inputs(model, tokens, attention_mask, position_ids, schedule,
                                                 prefill, decode_steps, chunk)
    implementation = getattr(model, "attn_implementation", "eager")
    report = ParityReport(f"lens_det cached vs uncached ({model.cfg.dtype}, {implementation} attention)", schedule,
                          atol, rtol, attn_implementation=implementation)
    names_filter = None if ops.is_deterministic() else _sdpa_filter(model, report)  # deterministic: eager ops
    with torch.no_grad():
        full_logits, full = model.run_with_cache(tokens, attention_mask=mask, position_ids=positions,
                                                 names_filter=names_filter)
    report.n_hooks = len(full.keys())
    diff_chunked_run(report, model, tokens, mask, positions, schedule.bounds(), full, full_logits, "cached",
                     names_filter=names_filter)
    return report


def _sdpa_filter(model: Any, report: ParityReport):
    """Under sdpa: list the pattern hooks in report.not_compared and return a names_filter that leaves them out of
    run_with_cache (requesting them would run those layers eagerly); None under eager."""
    if getattr(model, "attn_implementation", "eager") != "sdpa":
        return None
    off = model.disabled_hook_points()
    report.not_compared |= {name: SDPA_NOT_COMPARED for name in model.hook_dict
                            if name.endswith(QUERY_KEY_HOOKS) and name not in off}
    return lambda name: not name.endswith(QUERY_KEY_HOOKS)


def diff_chunked_run(report, model, tokens, mask, positions, bounds, full, full_logits, step: str,
                     names_filter=None) -> None:
    """Run `model` with a fresh KV cache over `bounds` [(a, b), ...] and append to `report` each step's hooks
    against the same positions of an uncached run (`full`, `full_logits`). Pad query positions are zeroed on
    both sides (a fully masked row spreads evenly over whatever keys are present, docs/numerics.md §1.3).
    `names_filter`: which hooks to cache (run_with_cache's; None: all)."""
    cache = model.new_cache()
    real = mask.bool()
    for i, (a, b) in enumerate(bounds):
        with torch.no_grad():
            logits, ours = model.run_with_cache(tokens[:, a:b], attention_mask=mask[:, :b],
                                                position_ids=_slice(positions, a, b), kv_cache=cache,
                                                names_filter=names_filter)
        rows_real = real[:, a:b]
        for hook in [*ours.keys(), "logits"]:
            mine, whole = (logits, full_logits) if hook == "logits" else (ours[hook], full[hook])
            kind = hook_kind(hook)  # the axes from the registry (AltUp's stream stacks have batch at 1, pos at 2)
            whole = whole.narrow(kind.pos_axis, a, b - a)
            if kind.key_axis is not None:  # keys attended in this step: the last mine.shape[key] of [0, b)
                n_keys = mine.shape[kind.key_axis]
                whole = whole.narrow(kind.key_axis, b - n_keys, n_keys)
            shape = [1] * mine.ndim
            shape[kind.layout.index("batch")], shape[kind.pos_axis] = rows_real.shape
            keep = rows_real.view(shape)
            mine, whole = torch.where(keep, mine, 0), torch.where(keep, whole, 0)
            report.rows.append(diff_hook(f"{step}:{i}", hook, mine, whole, report.atol, report.rtol, a))


def assert_parity(model: Any, hf_model: Any, tokens: torch.Tensor, **kwargs) -> ParityReport:
    """pytest helper: `compare(...)`, raising AssertionError with the first divergence and the worst hooks."""
    report = compare(model, hf_model, tokens, **kwargs)
    if not report.passed:
        raise AssertionError("lens_det differs from HF\n" + report.to_text())
    return report
