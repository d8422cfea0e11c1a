"""What every layer of one forward call shares: the mask of everything seen, positions, and memoised masks,
ALiBi biases and RoPE tables (one copy per device, so layers on several devices each get their own)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lens_det.components.masks import additive_mask
from lens_det.components.positions import alibi_bias, rope_cos_sin


@dataclass
class ForwardContext:
    mask: torch.Tensor  # [batch, past + new] 0/1, everything attended so far plus the new tokens
    query_start: int  # absolute index of the first new token (tokens already in the cache)
    n_query: int
    dtype: torch.dtype
    position_ids: torch.Tensor | None = None  # [batch or 1, n_query] (RoPE models)
    # KV sharing: layer -> (keys, values, key_start) it attended to (after its cache update), for the layers that
    # read them (LensConfig.kv_source_layer). Made fresh for every forward call, so cache on and off agree.
    shared_kv: dict = field(default_factory=dict)
    # keep_last contexts: the full-length context whose sdpa masks this one slices (HF slices the masks it built for
    # all positions, so the None-or-tensor choice stays that of the full length)
    rows_of: ForwardContext | None = None
    _memo: dict = field(default_factory=dict)

    def keep_last(self, k: int) -> ForwardContext:
        """The context of the last `k` query positions only (same keys, same shared K/V): HF's
        `_maybe_slice_kv_shared_inputs`, which runs the KV-sharing layers on the last logits_to_keep positions."""
        positions = None if self.position_ids is None else self.position_ids[:, -k:]
        return ForwardContext(self.mask, self.query_start + self.n_query - k, k, self.dtype, positions,
                              self.shared_kv, rows_of=self.rows_of or self)

    def _get(self, key, build):
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def additive_mask(self, key_start: int, n_key: int, window: int | None, device) -> torch.Tensor:
        return self._get(
            ("mask", key_start, n_key, window, device),
            lambda: additive_mask(
                self.mask.to(device), self.query_start, self.n_query, key_start, n_key, window, self.dtype
            ),
        )

    def additive_mask_rows(self, key_start: int, n_key: int, window: int | None, device, rows: slice) -> torch.Tensor:
        """The additive mask of query rows `rows` only (not memoised: the query-chunked eager path builds one chunk at
        a time, so the whole [q, K] mask never exists); equal to additive_mask(...)[:, :, rows]."""
        n = len(range(self.n_query)[rows])
        return additive_mask(self.mask.to(device), self.query_start + rows.start, n, key_start, n_key, window,
                             self.dtype)

    def sdpa_mask(self, key_start: int, n_key: int, window: int | None, device) -> torch.Tensor | None:
        """The mask HF's sdpa path passes for these keys: None where HF relies on sdpa's `is_causal` (no padding in
        view and either one query or as many queries as keys, and for a sliding layer fewer keys than the window),
        else a boolean [batch, 1, q, K] mask, True = attend. Built with transformers' own `sdpa_mask`, with the same
        offsets, lengths, window and padding mask as HF's create_causal_mask / create_sliding_window_causal_mask."""
        if self.rows_of is not None:
            full = self.rows_of.sdpa_mask(key_start, n_key, window, device)
            if full is None:
                return None
            return full[:, :, self.query_start - self.rows_of.query_start :][:, :, :self.n_query]

        def build():
            from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

            function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
            return sdpa_mask(batch_size=self.mask.shape[0], q_length=self.n_query, kv_length=n_key,
                             q_offset=self.query_start, kv_offset=key_start, mask_function=function,
                             attention_mask=self.mask.to(device=device, dtype=torch.bool), local_size=window,
                             allow_is_causal_skip=True, device=device)
        return self._get(("sdpa_mask", key_start, n_key, window, device), build)

    def key_positions(self, key_start: int, n_key: int, device) -> torch.Tensor:
        """Each key's index among the real tokens of its row ([batch, n_key]; -1 for pads)."""
        def build():
            mask = self.mask.to(device)
            pos = torch.where(mask.bool(), mask.cumsum(-1) - 1, -1)
            return pos[:, key_start : key_start + n_key]
        return self._get(("key_pos", key_start, n_key, device), build)

    def alibi(self, slopes: torch.Tensor, key_start: int, device) -> torch.Tensor:
        full = self._get(("alibi", device), lambda: alibi_bias(self.mask.to(device), slopes, self.dtype))
        return full if key_start == 0 else full[..., key_start:]

    def rope(self, inv_freq: torch.Tensor, key, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self._get(
            ("rope", key, device),
            lambda: rope_cos_sin(self.position_ids.to(device), inv_freq.to(device), self.dtype),
        )
