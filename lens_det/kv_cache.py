"""KVCache: a caller-owned cache of keys, values and the 2-D mask of everything seen.

Per layer it holds keys (post-RoPE, post q/k-norm) and values [batch, kv_heads, pos, d_head] on that layer's
device, the way HF's DynamicCache does (docs/numerics.md §1.5): full-attention layers keep everything, sliding-window
layers keep the last W - 1 positions; KV-sharing consumer layers store nothing (their source layer's keys and values
are handed over within each forward call, as HF's KVSharingDict). Positions are not stored: ALiBi and mask-derived
RoPE positions are recomputed from the mask history, default RoPE positions continue from the number of tokens seen.

It also keeps the token ids it has seen ([batch, seen], pads included, beside the mask), so that a continuation
can tell which of the tokens it is given the cache already holds (HF generate's `past_key_values` rule), and what
a `generate` call left pending: its last generated tokens, which the cache does not hold yet, and which rows had
finished, so that a continuation of that call keeps those rows finished.

A forward call stages its updates and commits them only when the whole call succeeded, so an error (bad input,
a hook that raises) leaves the cache unchanged. A frozen cache is read but never grown.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lens_det.config import LensConfig


@dataclass
class PendingGeneration:
    """What a `generate` call left in its cache: its last generated tokens [batch, 1] (not run yet, so not in the
    cache) and the rows that had finished [batch] (bool). A continuation that runs exactly these tokens next
    resumes that call; any other input, or any forward in between (which clears it), starts every row afresh."""

    tokens: torch.Tensor
    finished: torch.Tensor


class KVCacheEntry:
    """Keys and values of one layer; `start` is the absolute (padded) index of the first stored position."""

    def __init__(self, window: int | None):
        self.window = window
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.start = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Stage k, v [batch, kv_heads, new, d_head]; return (keys, values, start) of everything to attend."""
        if self.keys is None:  # HF concatenates onto an empty tensor, which makes a contiguous copy
            keys, values = k.new_empty(*k.shape[:2], 0, k.shape[3]), v.new_empty(*v.shape[:2], 0, v.shape[3])
        else:
            keys, values = self.keys, self.values
        k_all, v_all = torch.cat([keys, k], dim=-2), torch.cat([values, v], dim=-2)
        self._pending = (k_all, v_all)
        return k_all, v_all, self.start

    def commit(self) -> None:
        k_all, v_all = self._pending
        self._pending = None
        keep = k_all.shape[-2] if self.window is None else min(k_all.shape[-2], self.window - 1)
        self.start += k_all.shape[-2] - keep
        self.keys, self.values = k_all[:, :, k_all.shape[-2] - keep :], v_all[:, :, k_all.shape[-2] - keep :]

    def discard(self) -> None:
        self._pending = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class SharedKVEntry:
    """The entry of a KV-sharing consumer layer (LensConfig.kv_source_layer): it stores nothing (its keys and
    values are its source layer's, handed over within each forward call), like HF's DummyLayer."""

    keys = values = None
    start = 0
    length = 0
    nbytes = 0

    def __init__(self, source: int):
        self.source = source

    def update(self, k, v):
        raise RuntimeError(f"a KV-sharing layer stores nothing; its keys/values are layer {self.source}'s")

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass


def _entry(config: LensConfig, layer: int):
    source = config.layer_kv_source(layer)
    if source is not None:
        return SharedKVEntry(source)
    return KVCacheEntry(config.sliding_window if config.layer_types[layer] == "sliding_attention" else None)


class KVCache:
    """Caller-owned KV cache: `model(tokens, attention_mask=full_mask, kv_cache=cache)` appends the new tokens."""

    def __init__(self, config: LensConfig, max_length: int | None = None):
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"max_length must be an int >= 1 (or None for no cap), got {max_length!r}")
        self.config = config
        self.max_length = max_length
        # KV-sharing consumer layers get a SharedKVEntry that stores nothing (nbytes counts producers only)
        self.layers = [_entry(config, i) for i in range(config.n_layers)]
        self.mask: torch.Tensor | None = None  # [batch, seen] 0/1 (long)
        self.tokens: torch.Tensor | None = None  # [batch, seen] the token ids seen (long)
        self.pending: PendingGeneration | None = None  # set by generate, cleared by the next forward
        self.frozen = False

    @property
    def length(self) -> int:
        """Tokens seen so far (pads included): the absolute index the next token gets."""
        return 0 if self.mask is None else self.mask.shape[1]

    @property
    def batch_size(self) -> int | None:
        return None if self.mask is None else self.mask.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.layers)

    def freeze(self) -> KVCache:
        """Stop growing: later calls attend to the cached prefix but store nothing (shared-prefix experiments)."""
        self.frozen = True
        return self

    def unfreeze(self) -> KVCache:
        self.frozen = False
        return self

    def clone(self) -> KVCache:
        """An independent copy (fork a branch from a shared prefix)."""
        other = KVCache(self.config, self.max_length)
        other.mask = None if self.mask is None else self.mask.clone()
        other.tokens = None if self.tokens is None else self.tokens.clone()
        if self.pending is not None:
            other.pending = PendingGeneration(self.pending.tokens.clone(), self.pending.finished.clone())
        other.frozen = self.frozen
        for mine, theirs in zip(self.layers, other.layers):
            theirs.start = mine.start
            if mine.keys is not None:
                theirs.keys, theirs.values = mine.keys.clone(), mine.values.clone()
        return other

    def to(self, device) -> KVCache:
        """Move every layer's tensors (and the mask, token ids and pending generation) to one device, in place."""
        if self.mask is not None:
            self.mask, self.tokens = self.mask.to(device), self.tokens.to(device)
        if self.pending is not None:
            self.pending = PendingGeneration(self.pending.tokens.to(device), self.pending.finished.to(device))
        for entry in self.layers:
            if entry.keys is not None:
                entry.keys, entry.values = entry.keys.to(device), entry.values.to(device)
        return self

    def check_compatible(self, config: LensConfig, batch: int, dtype: torch.dtype, n_new: int) -> None:
        """Refuse (ValueError, saying what to do) a forward call this cache cannot serve: a model of another
        config, another batch size than it holds, a model dtype other than its keys', or `n_new` more tokens
        than max_length leaves room for."""
        if self.config != config:
            raise ValueError("kv_cache was made for a model with a different config; use model.new_cache()")
        if self.batch_size is not None and self.batch_size != batch:
            raise ValueError(
                f"tokens have batch size {batch} but the cache holds batch size {self.batch_size}; "
                "use a new cache (model.new_cache()) or the same batch"
            )
        cached = next((e.keys for e in self.layers if e.keys is not None), None)  # consumers: None
        if cached is not None and cached.dtype != dtype:
            raise ValueError(f"the cache holds {cached.dtype} but the model runs in {dtype}; "
                             "use a new cache after changing the model dtype")
        if self.max_length is not None and self.length + n_new > self.max_length:
            raise ValueError(
                f"the cache holds {self.length} tokens and {n_new} more would exceed its max_length "
                f"{self.max_length}; use a larger max_length or a new cache"
            )

    def commit(self, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Keep the staged keys and values, the mask of everything seen and the new tokens [batch, new] (the model
        calls it once a forward call has succeeded)."""
        for entry in self.layers:
            entry.commit()
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens.to(self.tokens.device)], 1)
        self.mask = mask
        self.pending = None

    def discard(self) -> None:
        """Drop the staged keys and values (the model calls it when a forward call failed, or the cache is
        frozen), leaving the cache as it was before the call."""
        for entry in self.layers:
            entry.discard()

    _commit, _discard = commit, discard  # the names before they became public

    def __repr__(self) -> str:
        stored = sorted({entry.length for entry in self.layers if isinstance(entry, KVCacheEntry)})
        return (
            f"KVCache(layers={len(self.layers)}, tokens_seen={self.length}, batch={self.batch_size}, "
            f"stored_positions={stored}, bytes={self.nbytes}, frozen={self.frozen})"
        )
