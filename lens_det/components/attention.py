"""Attention: projections, optional q/k norm, RoPE or ALiBi, the KV cache, masking and the eager core.

The op sequence and tensor layouts mirror HF eager (docs/numerics.md §1.6, §2.4, §3.5), which is what makes the
outputs bit-identical; hooks see TransformerLens shapes ([batch, pos, head_index, d_head]).
"""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace

import torch
from torch import nn
from lens_det.hooks import HookPoint, is_hooked

from lens_det import ops
from lens_det.components.context import ForwardContext
from lens_det.components.norms import make_optional_norm
from lens_det.components.positions import alibi_slopes, apply_rope, rope_inv_freq
from lens_det.components.scales import SoftCap  # moved to scales.py; re-exported here
from lens_det.config import LensConfig


EAGER_QUERY_CHUNK = 256  # query rows per eager chunk: memory grows with T x 256, not T x T
MIN_CHUNK_ROWS = 16  # no chunk is shorter (query_chunks)
SDPA_PATTERN_FALLBACK = (
    "a hook (or a run_with_cache request) on hook_attn_scores / hook_pattern of an sdpa model: sdpa computes no "
    "pattern, so those layers ran eager attention for this call (their pattern is the one that produced their "
    "output, and their outputs equal HF eager's, not HF sdpa's, up to rounding). Leave the pattern hooks out "
    "(names_filter) to stay sdpa-exact, or set model.attn_implementation = 'eager'")


def query_chunks(n_query: int, chunk: int) -> list[slice]:
    """Row ranges of `chunk` queries; a remainder under MIN_CHUNK_ROWS joins the last range. GEMMs of 1-3 rows take
    another kernel (matrix-vector) and round differently from the same rows inside a larger call (measured; the op
    audit's "eager query chunks" row checks both)."""
    starts = list(range(0, n_query, chunk))
    if len(starts) > 1 and n_query - starts[-1] < MIN_CHUNK_ROWS:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n_query])]


@functools.lru_cache(maxsize=1)
def _blas_rows_independent() -> bool:
    """Whether a GEMM's output rows do not depend on how many rows the call has (MKL in strict CNR mode; fixed for
    the process once its first GEMM ran)."""
    from lens_det.blas import blas_mode

    mode = blas_mode()
    return mode.backend == "mkl" and mode.strict


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, K, d] -> [B, Hkv * n_rep, K, d], kv head g serving query heads g*n_rep ... (HF repeat_kv)."""
    if n_rep == 1:
        return x
    b, h_kv, k, d = x.shape
    return x[:, :, None, :, :].expand(b, h_kv, n_rep, k, d).reshape(b, h_kv * n_rep, k, d)


class Attention(nn.Module):
    def __init__(self, cfg: LensConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        # This layer's geometry (Gemma 4's full-attention layers differ from the others: LensConfig.d_head_per_layer)
        self.d_head, self.n_kv_heads, self.n_rep = cfg.layer_d_head(layer), cfg.layer_n_key_value_heads(layer), \
            cfg.layer_n_rep(layer)
        self.k_eq_v = cfg.layer_k_eq_v(layer)
        # KV sharing (Gemma 4): a consumer attends to kv_source's keys/values and projects none of its own; a layer
        # some consumer reads puts its keys/values (after the cache update: past + new) in the forward context.
        self.kv_source = cfg.layer_kv_source(layer)
        self.shares_kv = layer in (cfg.kv_source_layer or ())
        own_kv = self.kv_source is None
        h, h_kv, d, d_model = cfg.n_heads, self.n_kv_heads, self.d_head, cfg.d_model
        if cfg.fused_qkv:  # Bloom: one [3 * H * d, d_model] projection, per head [q | k | v] (docs/numerics.md §2.4)
            self.w_qkv = nn.Parameter(torch.empty(3 * h * d, d_model))
            self.b_qkv = nn.Parameter(torch.zeros(3 * h * d)) if cfg.attn_bias else None
            self._project = self._project_fused
        else:
            self.w_q = nn.Parameter(torch.empty(h * d, d_model))
            self.w_k = nn.Parameter(torch.empty(h_kv * d, d_model)) if own_kv else None
            # K = V layers have no v projection: v is the k projection's output (before k_norm and RoPE, §6.2)
            self.w_v = nn.Parameter(torch.empty(h_kv * d, d_model)) if own_kv and not self.k_eq_v else None
            self.b_q = nn.Parameter(torch.zeros(h * d)) if cfg.attn_bias else None
            self.b_k = nn.Parameter(torch.zeros(h_kv * d)) if cfg.attn_bias and own_kv else None
            self.b_v = nn.Parameter(torch.zeros(h_kv * d)) if cfg.attn_bias and own_kv and not self.k_eq_v else None
            self._project = self._project_split
        self.w_o = nn.Parameter(torch.empty(d_model, h * d))
        self.b_o = nn.Parameter(torch.zeros(d_model)) if cfg.attn_bias else None

        self.q_norm = make_optional_norm(cfg, cfg.qk_norm, dim=d)
        self.k_norm = make_optional_norm(cfg, cfg.qk_norm and own_kv, dim=d)
        self.v_norm = make_optional_norm(cfg, cfg.v_norm and own_kv, dim=d, weight=False)
        self.score_cap = SoftCap(cfg.attn_softcap) if cfg.attn_softcap else nn.Identity()
        self.window = cfg.sliding_window if cfg.layer_types[layer] == "sliding_attention" else None
        self.use_attn_result = False
        self.implementation = "eager"  # or "sdpa" (HookedDecoder.attn_implementation)
        # what HF's sdpa_attention_forward reads of its module (not a submodule: no parameters, no hooks)
        self._hf_view = SimpleNamespace(num_key_value_groups=self.n_rep, is_causal=True, layer_idx=layer)

        # Shapes use this layer's d_head and kv heads (cfg.layer_d_head(i), cfg.layer_n_key_value_heads(i)).
        # KV-sharing consumers have no hook_k / hook_v / hook_rot_k: their keys and values are kv_source's (patch
        # them there; the edit reaches every consumer, as in HF's data flow).
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        if own_kv:
            self.hook_k = HookPoint()  # [batch, pos, kv_head_index, d_head]
            self.hook_v = HookPoint()  # [batch, pos, kv_head_index, d_head] (K = V layers: the k projection again)
        if cfg.positional == "rope":
            fraction = cfg.layer_rope_rotary_fraction(layer)
            self.rope_args = (d, cfg.rope_theta[layer], cfg.rope_linear_factor[layer], fraction)  # sets inv_freq
            self.hook_rot_q = HookPoint()  # [batch, pos, head_index, d_head]
            if own_kv:
                self.hook_rot_k = HookPoint()  # [batch, pos, kv_head_index, d_head]
            self._position, self._score_bias = self._rope, self._no_bias
        else:
            self.slopes = alibi_slopes(h)
            self._position, self._score_bias = self._no_rotation, self._alibi_bias
        self.hook_attn_scores = HookPoint()  # [batch, head_index, query_pos, key_pos] (softmax input)
        self.hook_pattern = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head_index, d_model] (only with use_attn_result)

    @property
    def rope_args(self) -> tuple:
        """rope_inv_freq's arguments (d_head, theta, linear_factor, rotary_fraction), also the key under which the
        forward context memoises the cos/sin tables. Setting them sets `inv_freq`, rope_inv_freq(*rope_args): a plain
        float32 attribute, not a buffer, so that model.to(bfloat16) cannot round it (docs/numerics.md §3.4)."""
        return self._rope_args

    @rope_args.setter
    def rope_args(self, args: tuple) -> None:
        self._rope_args = args
        self.inv_freq = rope_inv_freq(*args)

    # --- projections: return q, k, v as [batch, pos, head, d_head] ---
    def _project_fused(self, x):
        b, t, _ = x.shape
        fused = ops.linear(x, self.w_qkv, self.b_qkv).view(b, t, self.cfg.n_heads, 3, self.d_head)
        return fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]

    def _project_split(self, x):
        b, t, _ = x.shape
        shape = (b, t, -1, self.d_head)
        q = ops.linear(x, self.w_q, self.b_q).view(shape)
        if self.kv_source is not None:  # KV-sharing consumer: keys and values come from kv_source
            return q, None, None
        k = ops.linear(x, self.w_k, self.b_k).view(shape)
        v = k if self.k_eq_v else ops.linear(x, self.w_v, self.b_v).view(shape)
        return q, k, v

    # --- positions: RoPE rotates q and k ([batch, head, pos, d_head]); ALiBi adds a bias to the scores ---
    def _rope(self, q, k, ctx: ForwardContext):
        cos, sin = ctx.rope(self.inv_freq, self.rope_args, q.device)
        q = self.hook_rot_q(apply_rope(q, cos, sin).transpose(1, 2)).transpose(1, 2)
        if k is not None:  # None on KV-sharing consumers (their keys were rotated by kv_source)
            k = self.hook_rot_k(apply_rope(k, cos, sin).transpose(1, 2)).transpose(1, 2)
        return q, k

    def _no_rotation(self, q, k, ctx: ForwardContext):
        return q, k

    def _no_bias(self, ctx: ForwardContext, key_start: int, device):
        return None

    def _alibi_bias(self, ctx: ForwardContext, key_start: int, device):
        return ctx.alibi(self.slopes, key_start, device)

    def _publish_kv(self, ctx: ForwardContext, k, v, key_start: int) -> None:
        """Hand this layer's keys and values (after its cache update: past + new, [batch, kv_head, key, d_head]) to
        the layers that share them, for this forward call only (HF: KVSharingDict, filled by the "store" layer)."""
        ctx.shared_kv[self.layer] = (k, v, key_start)

    def _reproject(self, qkv, edits):
        """Replace the heads of q, k, v whose input was edited (Block._per_head_inputs: {head: ln1(input)} per
        kind) by that head's projection of its own input; the other heads are kept as they are."""
        out = []
        for kind, t, per_head, weights in zip("qkv", qkv, edits, self.qkv_weights()):
            if per_head and t is None:
                raise ValueError(f"layer {self.layer} reads the keys/values of layer {self.kv_source} (KV sharing), so "
                                 f"an edit of its hook_{kind}_input has no effect; edit blocks.{self.kv_source}'s")
            if per_head:
                w, bias = weights
                t = t.clone()
                for h, inp in per_head.items():
                    t[:, :, h] = ops.linear(inp, w[h], None if bias is None else bias[h])
            out.append(t)
        return out

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache_entry=None, head_edits=None) -> torch.Tensor:
        """`x`: ln1's output. `head_edits`: per-head q/k/v inputs edited through TL's hook_attn_in / hook_q_input /
        hook_k_input / hook_v_input (Block._per_head_inputs); those heads read them instead of x."""
        b, t, _ = x.shape
        q, k, v = self._project(x)
        if head_edits is not None:
            q, k, v = self._reproject((q, k, v), head_edits)
        q = self.q_norm(self.hook_q(q)).transpose(1, 2)  # HF layout [batch, head, pos, d_head]
        if self.kv_source is None:
            k = self.k_norm(self.hook_k(k)).transpose(1, 2)
            v = self.v_norm(self.hook_v(v)).transpose(1, 2)
            q, k = self._position(q, k, ctx)
            if cache_entry is None:
                key_start = 0
            else:
                k, v, key_start = cache_entry.update(k, v)
            if self.shares_kv:
                self._publish_kv(ctx, k, v, key_start)
        else:
            q, _ = self._position(q, None, ctx)
            k, v, key_start = ctx.shared_kv[self.kv_source]
            k, v = k.to(x.device), v.to(x.device)  # kv_source may sit on another device
        n_key = k.shape[-2]
        if self._runs_sdpa():
            z = self._sdpa(q, k, v, ctx, key_start, n_key, x.device)
        else:
            z = self._eager(q, k, v, ctx, key_start, n_key, x.device)
        z = self.hook_z(z)
        if self.use_attn_result:
            w_o = self.w_o.view(self.cfg.d_model, self.cfg.n_heads, self.d_head)
            result = torch.einsum("bqhd,mhd->bqhm", z, w_o)
            hooked = self.hook_result(result)
            if hooked is not result:  # an edited per-head result is what the layer outputs
                return hooked.sum(2) + (0 if self.b_o is None else self.b_o)
        return ops.linear(z.reshape(b, t, -1), self.w_o, self.b_o)

    # --- the attention core: eager (HF's eager_attention_forward, optionally over query chunks) or HF's sdpa call ---
    def _pattern_hooked(self) -> bool:
        """Whether anything hooks this layer's scores or pattern (forward, backward or caching hooks), which need the
        whole [query, key] tensors of the eager computation."""
        return is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern)

    def _runs_sdpa(self) -> bool:
        if self.implementation != "sdpa" or ops.is_deterministic():  # deterministic mode has its own eager ops
            return False
        if self._pattern_hooked():
            warnings.warn(SDPA_PATTERN_FALLBACK, stacklevel=4)
            return False
        return True

    def _sdpa(self, q, k, v, ctx: ForwardContext, key_start: int, n_key: int, device) -> torch.Tensor:
        """HF's sdpa_attention_forward on HF's tensors: q [batch, head, q, d], the un-repeated k / v [batch, kv_head,
        K, d], HF's mask (None or boolean), HF's scale; it picks GQA handling and is_causal as HF does. Returns z
        [batch, q, head, d]."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        mask = ctx.sdpa_mask(key_start, n_key, self.window, device)
        z, _ = sdpa_attention_forward(self._hf_view, q, k, v, mask, dropout=0.0, scaling=self.cfg.attn_scale)
        return z

    def _query_chunk(self, n_query: int) -> int | None:
        """Query rows per chunk of the eager core, or None to run all rows at once. Chunks give the same bits as one
        call only where every op is row-wise: the GEMMs rest on MKL's strict reproducibility mode (lens_det.blas;
        the op audit checks it), and an attention soft-cap's tanh is not row-wise (ATen's vectorised body and its
        remainder round differently), except in deterministic mode, whose ops are layout-invariant by design."""
        if n_query <= EAGER_QUERY_CHUNK or self._pattern_hooked():
            return None
        if ops.is_deterministic():
            return EAGER_QUERY_CHUNK
        return EAGER_QUERY_CHUNK if _blas_rows_independent() and not self.cfg.attn_softcap else None

    def _eager(self, q, k, v, ctx: ForwardContext, key_start: int, n_key: int, device) -> torch.Tensor:
        """HF eager attention; returns z [batch, q, head, d]."""
        bias = self._score_bias(ctx, key_start, device)
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        key_pos = ctx.key_positions(key_start, n_key, device) if ops.is_deterministic() else None
        chunk = self._query_chunk(q.shape[2])
        if chunk is None:
            return self._eager_rows(q, k, v, bias, ctx.additive_mask(key_start, n_key, self.window, device), key_pos)
        return torch.cat([
            self._eager_rows(q[:, :, rows], k, v, bias,
                             ctx.additive_mask_rows(key_start, n_key, self.window, device, rows), key_pos)
            for rows in query_chunks(q.shape[2], chunk)
        ], dim=1)

    def _eager_rows(self, q, k, v, bias, mask, key_pos) -> torch.Tensor:
        scores = self.score_cap(ops.attention_scores(q, k, self.cfg.attn_scale, bias))
        scores = self.hook_attn_scores(scores + mask)
        probs = self.hook_pattern(ops.softmax(scores, key_pos))
        return ops.attend(probs, v, key_pos).transpose(1, 2)

    # --- TransformerLens-shaped weight views ---
    def qkv_weights(self):
        """[(weight [head, d_head, d_model], bias [head, d_head] or None)] for q, k and v, HF's weights viewed per
        head (k and v over the kv heads); None for k and v on KV-sharing consumers."""
        h, d = self.cfg.n_heads, self.d_head
        if self.cfg.fused_qkv:
            w = self.w_qkv.view(h, 3, d, -1)
            bias = self.b_qkv.view(h, 3, d) if self.b_qkv is not None else None
            return [(w[:, i], None if bias is None else bias[:, i]) for i in range(3)]
        out = []
        v = (self.w_k, self.b_k) if self.k_eq_v else (self.w_v, self.b_v)  # K = V: values read the k projection
        for w, bias in ((self.w_q, self.b_q), (self.w_k, self.b_k), v):
            if w is None:  # KV-sharing consumer: no k / v projection
                out.append(None)
                continue
            n = w.shape[0] // d
            out.append((w.view(n, d, -1), None if bias is None else bias.view(n, d)))
        return out

    # TransformerLens's shapes. With grouped-query attention W_K/W_V/b_K/b_V are repeated to n_heads (query head h
    # reads kv head h // n_rep, as HF's repeat_kv), and _W_K/_W_V/_b_K/_b_V are the kv heads themselves.
    def repeat_kv_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Per-kv-head weights [kv_head, ...] -> per query head [head, ...] (query head h reads kv head h // n_rep)."""
        return x.repeat_interleave(self.n_rep, dim=0)

    def _weights(self, i: int):
        """(weight, bias) of q (0), k (1) or v (2); KV-sharing consumers have no k / v weights of their own."""
        weights = self.qkv_weights()[i]
        if weights is None:
            raise ValueError(f"layer {self.layer} has no key/value weights: it attends to the keys and values of "
                                 f"layer {self.kv_source} (KV sharing), computed from that layer's input; read "
                                 f"blocks[{self.kv_source}].attn's")
        return weights

    def _bias(self, i: int) -> torch.Tensor:
        w, b = self._weights(i)
        return b if b is not None else w.new_zeros(w.shape[:2])

    @property
    def W_Q(self):  # [head_index, d_model, d_head]
        return self.qkv_weights()[0][0].transpose(1, 2)

    @property
    def _W_K(self):  # [kv_head_index, d_model, d_head]
        return self._weights(1)[0].transpose(1, 2)

    @property
    def _W_V(self):  # [kv_head_index, d_model, d_head]
        return self._weights(2)[0].transpose(1, 2)

    @property
    def W_K(self):  # [head_index, d_model, d_head]
        return self.repeat_kv_heads(self._W_K)

    @property
    def W_V(self):  # [head_index, d_model, d_head]
        return self.repeat_kv_heads(self._W_V)

    @property
    def b_Q(self):  # [head_index, d_head] (zeros where the family has no bias)
        return self._bias(0)

    @property
    def _b_K(self):  # [kv_head_index, d_head]
        return self._bias(1)

    @property
    def _b_V(self):
        return self._bias(2)

    @property
    def b_K(self):  # [head_index, d_head]
        return self.repeat_kv_heads(self._b_K)

    @property
    def b_V(self):
        return self.repeat_kv_heads(self._b_V)

    @property
    def W_O(self):  # [head_index, d_head, d_model]
        return self.w_o.view(self.cfg.d_model, self.cfg.n_heads, self.d_head).permute(1, 2, 0)

    @property
    def b_O(self):  # [d_model]
        return self.b_o if self.b_o is not None else torch.zeros_like(self.w_o[:, 0])
