"""The argument coercion and checks that forward, generate, parity and determinism share: the dtypes lens_det runs
in, text or to_tokens' pair into token ids, token ids, a residual stream for start_at_layer, the layer range, the
KV cache argument, the full 0/1 attention mask (and the refusal of an unmasked left-padded batch), and RoPE
position ids. Each raises before any compute, with what to pass instead.

Functions taking `model` read a HookedDecoder's config, tokenizer and embedding device only."""

from __future__ import annotations

import torch

from lens_det.components.positions import positions_from_mask
from lens_det.config import LensConfig
from lens_det.kv_cache import KVCache
from lens_det.tl.tokens import TO_TOKENS_IDIOM, TokensAndMask

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes whose HF reference lens_det matches


def check_dtype(dtype: torch.dtype, fix: str) -> torch.dtype:
    """`dtype` when lens_det runs in it, else ValueError ending with `fix` (what to pass instead)."""
    if dtype in SUPPORTED_DTYPES:
        return dtype
    why = (" (HF's own float64 models return NaN for every position of a left-padded row: their softmax runs in "
           "float32, where the mask value finfo(float64).min becomes -inf, so a fully masked pad row is NaN and "
           "spreads; the mixture of experts' grouped_mm has no float64 kernel. There is no HF reference to match)"
           if dtype == torch.float64 else "")
    raise ValueError(f"{dtype} is not supported{why}: lens_det runs torch.float32 (the default), torch.bfloat16 and "
                     f"torch.float16; {fix}")


def coerce_text(model, tokens, attention_mask, prepend_bos=None, padding_side=None):
    """A string or list of strings -> (tokens, their mask, True), tokenized by model.to_tokens (left-padded by
    default); to_tokens' (tokens, mask) pair -> (tokens, mask, False); token ids pass through."""
    if isinstance(tokens, (list, tuple)) and not tokens:
        raise ValueError("no prompts (an empty list): pass at least one string, or token ids [batch, pos]")
    if not (isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and isinstance(tokens[0], str))):
        given = [n for n, v in (("prepend_bos", prepend_bos), ("padding_side", padding_side)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} apply to text input (model.to_tokens reads them); token ids "
                             f"run as they are: drop {' and '.join(given)}, and give the padding as "
                             "attention_mask=mask")
        if isinstance(tokens, TokensAndMask):
            if attention_mask is not None:
                raise ValueError("the (tokens, mask) pair from model.to_tokens carries its own mask: pass the "
                                 "pair alone, or `tokens, mask = pair` and attention_mask=...")
            return (*tokens, False)
        return tokens, attention_mask, False
    if attention_mask is not None:
        raise ValueError("strings come with their own mask; pass token ids to give an attention_mask")
    return (*model.to_tokens(tokens, padding_side=padding_side, prepend_bos=prepend_bos), True)


def check_tokens(model, tokens) -> torch.Tensor:
    """Token ids as a [batch, pos] integer tensor (a 1-D tensor is one sequence) inside the model's vocabulary,
    on the model's embedding device."""
    if isinstance(tokens, TokensAndMask):
        raise TypeError(TO_TOKENS_IDIOM)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}; "
                        "use model.to_tokens(text) for strings")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}; pass tokens.long()")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must have shape [batch, pos] with pos >= 1, got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError(f"a batch of 0 prompts (tokens of shape {tuple(tokens.shape)}): pass at least one row")
    d_vocab = model.config.d_vocab
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= d_vocab):
        bad = tokens[(tokens < 0) | (tokens >= d_vocab)][0].item()
        raise ValueError(
            f"token id {bad} is outside the vocabulary [0, {d_vocab}); "
            "check that the tokenizer belongs to this model"
        )
    return tokens.to(model.embed.W_E.device)


def check_residual(resid, d_model: int) -> torch.Tensor:
    """start_at_layer's first argument: a float residual stream [batch, pos, d_model] (2-D: one sequence)."""
    if not isinstance(resid, torch.Tensor) or not resid.is_floating_point():
        raise TypeError("with start_at_layer the first argument is the residual stream [batch, pos, d_model] "
                        f"(a float tensor), got {type(resid).__name__}")
    resid = resid[None] if resid.ndim == 2 else resid
    if resid.ndim == 3 and resid.shape[0] == 0:
        raise ValueError(f"a batch of 0 rows (a residual stream of shape {tuple(resid.shape)}): pass at least one")
    if resid.ndim != 3 or resid.shape[-1] != d_model or resid.shape[1] == 0:
        raise ValueError(f"the residual stream must have shape [batch, pos, {d_model}], got {tuple(resid.shape)}")
    return resid


def tokens_for_residual(model, resid, input_ids) -> torch.Tensor:
    """start_at_layer: the token ids behind the residual stream (per-layer embeddings need them), else zeros
    that only give shape and device."""
    if input_ids is None:
        if model.config.d_per_layer_input:
            raise ValueError("this model has per-layer embeddings, which every block reads from the token ids: "
                             "with start_at_layer pass input_ids=<the tokens of the residual's positions>")
        return torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)
    ids = check_tokens(model, input_ids)
    if ids.shape != resid.shape[:2]:
        raise ValueError(f"input_ids has shape {tuple(ids.shape)} but the residual stream has "
                         f"{tuple(resid.shape[:2])} positions")
    return ids


def layer_range(config: LensConfig, start_at_layer, stop_at_layer, kv_cache, return_type) -> tuple[int, int]:
    """The blocks [start, stop) that start_at_layer / stop_at_layer run (negative counts from the end), refusing
    a range that skips a KV-sharing source layer, or that a growing cache or a loss would need whole."""
    n = config.n_layers

    def index(value, name):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not -n <= value <= n:
            raise ValueError(f"{name} must be an int in [-{n}, {n}], got {value!r}")
        return value % n if value < 0 else value

    start, stop = index(start_at_layer, "start_at_layer") or 0, index(stop_at_layer, "stop_at_layer")
    stop = n if stop is None else stop
    if start >= stop and stop_at_layer is not None:
        raise ValueError(f"start_at_layer {start} must come before stop_at_layer {stop}")
    skipped = sorted({j for i in range(start, stop) if (j := config.layer_kv_source(i)) is not None and j < start})
    if skipped:
        raise ValueError(f"start_at_layer={start} skips layer(s) {skipped}, whose keys/values later layers attend to "
                         "(KV sharing), so they cannot run from a residual stream alone; start at or before "
                         f"layer {skipped[0]}")
    partial = start_at_layer is not None or stop_at_layer is not None
    if partial and kv_cache is not None and not kv_cache.frozen:
        raise ValueError("start_at_layer/stop_at_layer run only some layers, which cannot grow the KV cache of "
                         "every layer; pass kv_cache.freeze() (read only) or no cache")
    if partial and return_type in ("loss", "both"):
        raise ValueError("the loss needs the whole model run from token ids; drop start_at_layer/stop_at_layer")
    return start, stop


def kv_cache_argument(kv_cache, past_kv_cache) -> KVCache | None:
    """kv_cache, or past_kv_cache (TransformerLens's name for it); either must be a lens_det KVCache."""
    if past_kv_cache is not None:
        if kv_cache is not None:
            raise ValueError("pass kv_cache or past_kv_cache (TransformerLens's name for it), not both")
        kv_cache = past_kv_cache
    if kv_cache is not None and not isinstance(kv_cache, KVCache):
        raise TypeError(f"the KV cache must be a lens_det KVCache, got {type(kv_cache).__name__}: pass "
                        "kv_cache=model.new_cache() (a TransformerLens HookedTransformerKeyValueCache / "
                        "TransformerLensKeyValueCache holds another layout, which lens_det does not read)")
    return kv_cache


def check_binary_mask(mask: torch.Tensor) -> None:
    """An attention mask must hold only 0 (pad) and 1 (real token)."""
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 (pad) and 1 (real token)")


def refuse_unmasked_left_padding(model, tokens) -> None:
    """With no mask and nothing cached: a batch where some rows, but not all, start with the pad token is
    what to_tokens' left padding makes, and run unmasked it would attend to the pads, so it is refused (the
    longest row of a padded batch has no pad). Nothing is inferred: a real token may equal the pad id (a
    BOS-less row), and a pad id equal to BOS cannot be told from it."""
    tok = model.tokenizer
    if tok is None:
        pad, bos = model.config.pad_token_id, model.config.bos_token_id
    else:  # what to_tokens pads with
        pad, bos = (tok.pad_token_id if tok.pad_token is not None else tok.eos_token_id), tok.bos_token_id
    if tokens.shape[0] < 2 or pad is None or pad == bos:
        return
    starts_with_pad = tokens[:, 0] == pad
    if starts_with_pad.any() and not starts_with_pad.all():
        rows = starts_with_pad.nonzero().flatten().tolist()
        raise ValueError(
            f"row(s) {rows} of this batch start with the pad token (id {pad}) and the others do not: a "
            "left-padded batch, which without its mask would attend to the pads. Pass attention_mask=mask "
            "(`tokens, mask = model.to_tokens(texts)`), or the pair model.to_tokens returns, or the texts "
            "themselves; if those leading tokens are real, pass attention_mask=torch.ones_like(tokens)"
        )


def full_mask(model, tokens, attention_mask, kv_cache) -> torch.Tensor:
    """The 0/1 mask [batch, cached + new] (long, on the tokens' device) of everything the call attends to: the
    given mask, checked against the cache's history, or (None) the cached mask followed by ones. The cache must
    fit the call (KVCache.check_compatible)."""
    batch, n_new = tokens.shape
    past = 0
    if kv_cache is not None:
        kv_cache.check_compatible(model.config, batch, model.embed.W_E.dtype, n_new)
        past = kv_cache.length
    device = tokens.device
    if attention_mask is None:
        if past == 0:
            refuse_unmasked_left_padding(model, tokens)
        new = torch.ones(batch, n_new, dtype=torch.long, device=device)
        return new if past == 0 else torch.cat([kv_cache.mask.to(device), new], dim=1)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.shape != (batch, past + n_new):
        extra = f"the cache holds {past} tokens plus {n_new} new ones; " if past else ""
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but {extra}tokens need "
            f"{(batch, past + n_new)}: pass the mask for all {past + n_new} positions"
        )
    check_binary_mask(attention_mask)
    mask = attention_mask.to(device=device, dtype=torch.long)
    if past and not torch.equal(mask[:, :past], kv_cache.mask.to(device)):
        raise ValueError(
            "attention_mask disagrees with the mask the cache was built with on the cached positions; "
            "pass the same history (cache.mask) followed by the new tokens' mask"
        )
    return mask


def resolve_positions(position_ids, mask: torch.Tensor, past: int, n_new: int, positional: str):
    """The RoPE position ids [batch or 1, n_new] of the new tokens, from forward's `position_ids`: "mask" ->
    cumsum(mask) - 1 with pads at 0 (HF generate), a tensor -> itself (checked, on its own device). None for
    None / "arange", meaning arange(past, past + n_new) (HF forward's default, which the caller builds), and always
    for ALiBi (positional="alibi"), whose positions come from the mask. `mask` is [batch, past + n_new]."""
    if positional == "alibi" or position_ids is None or (isinstance(position_ids, str) and position_ids == "arange"):
        return None
    if isinstance(position_ids, str) and position_ids == "mask":
        return positions_from_mask(mask)[:, past:]
    if isinstance(position_ids, torch.Tensor):
        if position_ids.ndim != 2 or position_ids.shape[1] != n_new or position_ids.shape[0] not in (1, len(mask)):
            raise ValueError(f"position_ids must have shape [{len(mask)} or 1, {n_new}], "
                             f"got {tuple(position_ids.shape)}")
        return position_ids
    raise ValueError(f"position_ids must be None, 'arange', 'mask' or a tensor, got {position_ids!r}")
