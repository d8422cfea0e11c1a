"""HookedDecoder: the one model class for Bloom and the Gemma family (Gemma 1, 2, 3, 4 and VaultGemma), a
`transformer_lens.HookedRootModule`.

This module holds the forward core: the modules, the forward pass (with and without a KV cache) and its runtime
choices (attention / experts implementation, dtype, device placement, torch.compile's hook guards). The
TransformerLens surface is mixed in from lens_det.tl (TLWeights, TLTokens, TLInterface), the argument checks come
from lens_det.inputs, and the KV cache checks that it fits a call itself (KVCache.check_compatible).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import nn
from transformer_lens import HookedRootModule
from lens_det.components.hooks import HookPoint

from lens_det import ops
from lens_det.components.block import Block
from lens_det.components.context import ForwardContext
from lens_det.components.embed import Embed, Unembed
from lens_det.components.norms import make_norm
from lens_det.components.per_layer import PerLayerEmbed
from lens_det.components.streams import StreamsIn, StreamsOut
from lens_det.config import LensConfig
from lens_det.inputs import (check_dtype, check_residual, check_tokens, coerce_text, full_mask, kv_cache_argument,
                             layer_range, resolve_positions, tokens_for_residual)
from lens_det.kv_cache import KVCache
from lens_det.sae.splice import SAEMixin
from lens_det.tl.config_view import TLConfigView
from lens_det.tl.interface import TLInterface
from lens_det.tl.tokens import TLTokens, TokensAndMask
from lens_det.tl.weights import TLWeights

# Names that lived here before the TransformerLens surface moved to lens_det.tl and the checks to lens_det.inputs
from lens_det.inputs import SUPPORTED_DTYPES  # noqa: F401
from lens_det.tl.activation_cache import LensActivationCache, unknown_hook_message  # noqa: F401
from lens_det.tl.config_view import RuntimeConfig  # noqa: F401
from lens_det.tl.tokens import NO_TOKENIZER, TO_TOKENS_IDIOM  # noqa: F401

PositionIds = Int[torch.Tensor, "batch pos"] | Literal["arange", "mask"] | None


class HookedDecoder(SAEMixin, TLWeights, TLTokens, TLInterface, HookedRootModule):
    """A decoder-only transformer whose every activation is a TransformerLens-named HookPoint.

    The forward pass reproduces the HF eager model of the same config bit for bit (docs/numerics.md).

    Hook protocol: while a forward call runs, `query_start` is the absolute (padded) index of the first position
    the running hooks see: the call's first token (the tokens the KV cache already held come before it), or, after
    the KV-sharing layers were cut to logits_to_keep positions, the first kept one. A hook that takes absolute
    positions (lens_det.patching.patch_hook) reads it; generate's step hooks set it to the first position of the
    slice they hand on (lens_det.generation). Between calls it keeps the last call's value.
    """

    def __init__(self, config: LensConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = config
        self.embed = Embed(config)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if config.d_per_layer_input:  # Gemma 4 per-layer embeddings (lens_det.components.per_layer)
            self.ple = PerLayerEmbed(config)
            self.hook_per_layer_inputs = HookPoint()  # [batch, pos, n_layers, d_per_layer_input]
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        # HF's _maybe_slice_kv_shared_inputs: from this layer on every layer is a KV-sharing consumer, so with an
        # integer logits_to_keep they run on the kept positions only (None: no such tail)
        sources = config.kv_source_layer or (None,) * config.n_layers
        consumers = [i for i, j in enumerate(sources) if j is not None]
        tail = consumers and consumers == list(range(consumers[0], config.n_layers)) and config.cut_kv_tail
        self.kv_consumer_tail = consumers[0] if tail else None
        if config.n_streams > 1:  # AltUp (Gemma 3n): streams from the embedding, averaged before ln_final
            self.streams_in, self.streams_out = StreamsIn(config), StreamsOut(config)
        self.ln_final = make_norm(config)
        self.unembed = Unembed(config, self.embed)
        self.tokenizer = None
        self.name: str | None = None  # the checkpoint or named config it was loaded from (cfg.model_name)
        self.deterministic = False  # batch-invariant ops on every forward (same as `with lens_det.deterministic()`)
        self.query_start = 0  # the first absolute position the running hooks see (the class's hook protocol)
        self.processing: tuple[str, ...] = ()  # weight-processing steps applied (process_weights_); () = HF-exact
        self.to(device=device, dtype=dtype)
        self.eval()  # inference model (no dropout); TransformerLens' patching requires eval mode
        self.setup()

    @property
    def cfg(self) -> TLConfigView:
        return TLConfigView(self)

    def to(self, *args, **kwargs) -> HookedDecoder:
        """nn.Module.to; a dtype lens_det does not run in (float64, see check_dtype) is refused before anything
        moves."""
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]  # how nn.Module.to reads its arguments
        if dtype is not None:
            check_dtype(dtype, "use model.to(torch.float32) or model.to(torch.bfloat16)")
        return super().to(*args, **kwargs)

    def double(self):
        """Refused (raises): lens_det does not run in float64 (check_dtype says why)."""
        return check_dtype(torch.float64, "use model.float() (float32) or model.bfloat16()")

    def type(self, dst_type) -> HookedDecoder:
        """nn.Module.type; a dtype lens_det does not run in is refused before anything is cast."""
        if isinstance(dst_type, torch.dtype):
            check_dtype(dst_type, "use model.to(torch.float32) or model.to(torch.bfloat16)")
        return super().type(dst_type)

    @property
    def attn_implementation(self) -> str:
        """How attention computes, named as HF's `attn_implementation` (a runtime choice): "eager" (HF's
        eager_attention_forward: scores, mask, softmax, @ V) or "sdpa" (HF's call of
        torch.nn.functional.scaled_dot_product_attention, HF 5's default for Gemma 1, 3 and 4). The two round
        differently, and differ on fully padded query rows, so a model matches an HF model bit for bit only with
        the same choice; `from_hf_model` copies the HF model's. Under sdpa there is no hook_attn_scores /
        hook_pattern to compute: a layer whose pattern hooks are hooked runs eager for that call (with a warning).
        Deterministic mode runs its own eager ops either way (docs/numerics.md §10)."""
        return self.blocks[0].attn.implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        from lens_det.convert import resolve_attn_implementation

        if value is None:
            raise ValueError("attn_implementation must be 'eager' or 'sdpa', got None")
        value = resolve_attn_implementation(self.config, value)
        for block in self.blocks:
            block.attn.implementation = value

    @property
    def experts_implementation(self) -> str | None:
        """How the MoE experts compute (a runtime choice, as HF's `config._experts_implementation`): "grouped_mm"
        (HF's default) or "eager" (HF's loop over experts); the two round differently, so a model matches an HF
        model bit for bit only with the same choice. `from_hf_model` copies the HF model's. None without experts.
        Deterministic mode ignores it (lens_det.components.moe)."""
        return next((b.moe.implementation for b in self.blocks if hasattr(b, "moe")), None)

    @experts_implementation.setter
    def experts_implementation(self, value: str) -> None:
        from lens_det.components.moe import EXPERTS_IMPLEMENTATIONS

        if not self.config.n_experts:
            raise ValueError("this model has no mixture of experts (n_experts=0), so it has no experts_implementation")
        if value not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation must be one of {EXPERTS_IMPLEMENTATIONS}, got {value!r} "
                             "(other transformers implementations are not implemented)")
        for block in self.blocks:
            block.moe.implementation = value

    def new_cache(self, max_length: int | None = None) -> KVCache:
        """An empty KV cache for this model; `max_length` caps the tokens it may hold (checked before compute)."""
        return KVCache(self.config, max_length=max_length)

    @torch.compiler.disable(recursive=False)  # this frame stays Python; the frames it calls are still compiled
    def __call__(self, *args, **kwargs):
        """nn.Module's call, with torch.compile guarding on every module's hooks while it compiles this model's code.
        torch's default, `torch._dynamo.config.skip_nnmodule_hook_guards = True`, does not guard on a hook dict that
        was empty when a graph was compiled: a hook added later would not run (nor would the code that branches on
        whether a hook is attached), with no error. Set for the duration of this call and restored after (the config
        is process-wide: another thread compiling meanwhile sees it too). Covers `model.compile()`,
        `torch.compile(model)` and a model called in a compiled function (docs/numerics.md §12)."""
        config = torch._dynamo.config
        previous = config.skip_nnmodule_hook_guards
        config.skip_nnmodule_hook_guards = False  # by hand: config.patch(...) costs 4x as much per call
        try:
            return super().__call__(*args, **kwargs)
        finally:
            config.skip_nnmodule_hook_guards = previous

    def place(self, device_map: dict | None = None, n_devices: int | None = None) -> HookedDecoder:
        """Spread the model over devices: an explicit map ({"embed": ..., "blocks.3": "cuda:1", "ln_final": ...,
        "unembed": ...}, or accelerate's map of the HF model), or `n_devices` CUDA devices split evenly. Each part
        runs where it is placed. A map that would lose or never load weights raises ValueError before anything
        moves: "meta", "disk" (offload is chosen at load time: from_pretrained(dir, device_map=...)), parts whose
        weights are on meta (offloaded or never loaded), or a CUDA device this machine lacks."""
        from lens_det.devices import balanced_device_map, place

        if (device_map is None) == (n_devices is None):
            raise ValueError("pass exactly one of device_map and n_devices")
        if n_devices is not None:
            available = torch.cuda.device_count()
            if isinstance(n_devices, bool) or not isinstance(n_devices, int) or not 1 <= n_devices <= available:
                raise ValueError(f"n_devices={n_devices!r}, but this machine has {available} CUDA device(s); pass "
                                 "an int up to that, or a device_map such as {'blocks.0': 'cpu', '': 'cpu'}")
        place(self, device_map if device_map is not None else balanced_device_map(self.cfg.n_layers, n_devices))
        return self

    # --- forward ---
    def forward(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch all_pos"] | None = None,
        position_ids: PositionIds = None,
        kv_cache: KVCache | None = None,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        logits_to_keep: int = 0,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        loss_per_token: bool = False,
        input_ids: Int[torch.Tensor, "batch pos"] | None = None,
        past_kv_cache: KVCache | None = None,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ):
        """Run the model.

        Args:
            tokens: token ids [batch, pos] (a 1-D tensor is one sequence), a string / list of strings, which
                are tokenized left-padded with their mask (and, for RoPE models, positions from the mask), or the
                (tokens, mask) pair model.to_tokens returns, which runs as its text would.
            attention_mask: 0/1 [batch, cached + pos]: everything the cache holds plus the new tokens. None
                means all new tokens are real (and, with a cache, the cached mask is kept). With nothing cached, a
                batch where some rows, but not all, start with the pad token (to_tokens' left padding) is refused
                without it: pass the mask, or torch.ones_like(tokens) if those leading tokens are real.
            position_ids: RoPE positions. None or "arange": arange(cached, cached + pos) for every row, what HF
                `forward` does. "mask": cumsum(mask) - 1 with pads at 0, what HF `generate` does, so a left-padded
                row equals its unpadded prompt. Or an explicit [batch or 1, pos] tensor. Ignored by ALiBi models,
                whose positions always come from the mask.
            kv_cache: a `KVCache` (from `model.new_cache()`); the new positions are appended to it.
            return_type: "logits", "loss" (mean next-token cross-entropy over real tokens), "both" or None.
            logits_to_keep: unembed only the last k positions (0: all), as HF's `logits_to_keep`; HF generate
                uses 1, and the logits of one row are rounded differently than those of all rows. With KV sharing
                (Gemma 4 E2B/E4B) the consumer layers then run on the last k positions only, as HF's eager
                `_maybe_slice_kv_shared_inputs` (so their hooks see k positions); per-hook comparisons use 0.
            stop_at_layer: as TransformerLens: run blocks [start, stop) and return the residual stream entering
                block `stop` ([batch, pos, d_model], blocks.{stop}.hook_resid_pre); negative counts from the end.
                Later hooks do not fire, so run_with_cache stops harvesting there.
            start_at_layer: as TransformerLens: the first argument is then the residual stream entering that
                block (e.g. a cached blocks.{k}.hook_resid_pre), not token ids.
            With either, a KV cache must be frozen (read only): a partial run cannot grow every layer's cache.
            loss_per_token: with a loss, return it per position [batch, pos - 1] (0 where a pair has a pad).
            input_ids: with start_at_layer on a model with per-layer embeddings (Gemma 4 E2B/E4B), the token ids of
                the residual stream's positions: every block also reads per-layer inputs made from them and their
                embedding (TransformerLens's `tokens` argument of start_at_layer).
            past_kv_cache: TransformerLens's name of kv_cache (a lens_det KVCache; pass one of the two).
            prepend_bos, padding_side: for text input, how model.to_tokens tokenizes it (TransformerLens's
                meaning; defaults True and "left"). Token ids run as they are, so with them these raise.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if logits_to_keep and return_type in ("loss", "both"):
            raise ValueError("the loss needs every position's logits; use logits_to_keep=0 with return_type='loss'")
        kv_cache = kv_cache_argument(kv_cache, past_kv_cache)
        if self.config.n_streams > 1 and (start_at_layer is not None or stop_at_layer is not None):
            raise NotImplementedError("start_at_layer / stop_at_layer on a multi-stream (AltUp) model are not "
                                      "implemented: the residual between blocks is all streams, not one")
        start, stop = layer_range(self.config, start_at_layer, stop_at_layer, kv_cache, return_type)
        pair = isinstance(tokens, TokensAndMask)
        tokens, attention_mask, text = coerce_text(self, tokens, attention_mask, prepend_bos, padding_side)
        if (text or pair) and position_ids is None:
            position_ids = "mask"
        resid = None
        if start_at_layer is not None:  # the input is a residual stream; token ids only give shape and device
            resid = check_residual(tokens, self.config.d_model)
            tokens = tokens_for_residual(self, resid, input_ids)
        elif input_ids is not None:
            raise ValueError("input_ids is only for start_at_layer (the first argument holds the token ids otherwise)")
        else:
            tokens = check_tokens(self, tokens)
        mask = full_mask(self, tokens, attention_mask, kv_cache)
        ctx = self._context(tokens, mask, position_ids, kv_cache)
        mode = ops.deterministic() if self.deterministic else contextlib.nullcontext()
        self.query_start = ctx.query_start
        try:
            with mode:
                logits = self._forward_layers(tokens, ctx, kv_cache, return_type, logits_to_keep, start, stop, resid)
        except BaseException:
            if kv_cache is not None:
                kv_cache.discard()
            raise
        if kv_cache is not None:
            kv_cache.discard() if kv_cache.frozen else kv_cache.commit(mask, tokens)
        if return_type in (None, "logits") or stop < self.cfg.n_layers:
            return logits
        loss = next_token_loss(logits, tokens, mask[:, -tokens.shape[1] :], per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _forward_layers(self, tokens, ctx, kv_cache, return_type, logits_to_keep, start, stop, resid):
        x = self.hook_embed(self.embed(tokens)) if resid is None else resid
        per_layer = self._per_layer_inputs(tokens, x if resid is None else self.embed(tokens))
        if self.config.n_streams > 1:
            x = self.streams_in(x)
        for i in range(start, stop):
            if i == self.kv_consumer_tail and stop == self.cfg.n_layers and 0 < logits_to_keep < x.shape[1] \
                    and self._can_cut_kv_tail(ctx, logits_to_keep):
                ctx, x = ctx.keep_last(logits_to_keep), x[:, -logits_to_keep:]  # HF's _maybe_slice_kv_shared_inputs
                self.query_start = ctx.query_start  # later hooks see the kept positions only (patch_hook reads it)
                per_layer = None if per_layer is None else per_layer[:, -logits_to_keep:]
            block = self.blocks[i]
            x = block(x.to(block.ln1.w.device), ctx, None if kv_cache is None else kv_cache.layers[i],
                      None if per_layer is None else per_layer[:, :, i])
        if stop < self.cfg.n_layers:
            return x
        if self.config.n_streams > 1:
            x = self.streams_out(x.to(self.ln_final.w.device))
        x = self.ln_final(x.to(self.ln_final.w.device))
        return None if return_type is None else self.unembed(x[:, -logits_to_keep:] if logits_to_keep else x)

    def _can_cut_kv_tail(self, ctx, logits_to_keep: int) -> bool:
        """HF's _maybe_slice_kv_shared_inputs does not cut under sdpa when more than one position is kept and a layer
        type's mask is None (sdpa's is_causal then could not see the dropped queries). HF builds both layer types'
        masks, each sized against the first layer of its type (the first layer when the model has none)."""
        if self.attn_implementation != "sdpa" or logits_to_keep <= 1 or ops.is_deterministic():
            return True
        masks = []
        for window in (None, self.config.sliding_window):
            kind = "full_attention" if window is None else "sliding_attention"
            layer = next((i for i, t in enumerate(self.config.layer_types) if t == kind), 0)
            start, n_key = self._mask_sizes(ctx, layer)
            masks.append(ctx.sdpa_mask(start, n_key, window, ctx.mask.device))
        return all(m is not None for m in masks)

    def _mask_sizes(self, ctx, layer: int) -> tuple[int, int]:
        """(key_start, n_key) layer `layer` attends over in this call (HF's cache get_mask_sizes)."""
        total = ctx.query_start + ctx.n_query
        window = self.blocks[layer].attn.window
        if window is None or ctx.query_start < window:
            return 0, total
        return ctx.query_start - window + 1, window - 1 + ctx.n_query

    def _per_layer_inputs(self, tokens, embedding):
        """Gemma 4's per-layer embeddings [batch, pos, n_layers, d_per_layer_input] (None without them)."""
        if not self.config.d_per_layer_input:
            return None
        return self.hook_per_layer_inputs(self.ple(tokens, embedding))

    def _context(self, tokens, mask, position_ids, kv_cache) -> ForwardContext:
        past = 0 if kv_cache is None else kv_cache.length
        n_new = tokens.shape[1]
        positions = resolve_positions(position_ids, mask, past, n_new, self.config.positional)
        if positions is None and self.config.positional == "rope":  # HF forward's default
            positions = torch.arange(past, past + n_new, device=tokens.device)[None]
        return ForwardContext(mask, past, n_new, self.embed.W_E.dtype,
                              None if positions is None else positions.to(tokens.device))


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                    per_token: bool = False) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t, over pairs where both are real tokens (or, per
    token, [batch, pos - 1] with 0 where a pair has a pad)."""
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]
    keep = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)
    return nll * keep if per_token else (nll * keep).sum() / keep.sum().clamp(min=1)
