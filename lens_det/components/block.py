"""One decoder block; norms that a config lacks are identities, so forward has no architecture branches."""

from __future__ import annotations

import math

import torch
from torch import nn
from lens_det.hooks import HookPoint

from lens_det.components.attention import Attention
from lens_det.components.context import ForwardContext
from lens_det.components.mlp import make_mlp
from lens_det.components.moe import MixtureOfExperts
from lens_det.components.norms import make_norm, make_optional_norm
from lens_det.components.per_layer import PerLayerInputBlock
from lens_det.components.streams import AltUp, Laurel
from lens_det.config import LensConfig


class Block(nn.Module):
    """x -> x + ln1_post(attn(ln1(x))) -> + ln2_post(mlp(ln2(.))).

    Gemma 1's `post_attention_layernorm` is the pre-MLP norm (ln2); Gemma 2/3's is ln1_post
    (docs/numerics.md §3.6, §9.7). With `residual_from_norm` (Bloom's apply_residual_connection_post_layernorm)
    the residual branch starts from the norm's output (docs/numerics.md §2.3). hook_attn_out / hook_mlp_out are
    what is added to the residual stream. With `layer_scalar` (Gemma 4) the sum is then multiplied by the block's
    learned scalar, and hook_resid_post is that product (what the next block reads and HF's layer returns; HF
    multiplies in place, here a new tensor is made, so no hook's tensor is changed afterwards).

    With `n_experts` (Gemma 4's MoE block) the MLP slot holds two branches on the same residual x:
    dense = ln2_dense_post(mlp(ln2(x))) (hook_dense_mlp_out) and moe = ln2_moe_post(moe(x, ln2_moe(x)))
    (hook_moe_out), and hook_mlp_out = ln2_post(dense + moe) (docs/numerics.md §6.11).
    """

    hook_out_is_single_residual_stream = True  # hook_resid_post is the one stream ln_final reads (TL's logit lens)

    def __init__(self, cfg: LensConfig, layer: int):
        super().__init__()
        self.residual_from_norm = cfg.residual_from_norm
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ln1_post = make_optional_norm(cfg, cfg.post_attn_norm)
        self.ln2 = make_norm(cfg)
        self.mlp = make_mlp(cfg, layer)
        self.ln2_post = make_optional_norm(cfg, cfg.post_mlp_norm)
        if cfg.n_experts:
            self.ln2_dense_post = make_norm(cfg)  # HF post_feedforward_layernorm_1
            self.ln2_moe = make_norm(cfg)  # HF pre_feedforward_layernorm_2
            self.moe = MixtureOfExperts(cfg)
            self.ln2_moe_post = make_norm(cfg)  # HF post_feedforward_layernorm_2
            self.hook_dense_mlp_out = HookPoint()  # [batch, pos, d_model]: the dense branch, after its post-norm
            self.hook_moe_out = HookPoint()  # [batch, pos, d_model]: the MoE branch, after its post-norm
        self._feed_forward = self._dense_and_experts if cfg.n_experts else self._dense
        # A buffer in the model dtype, as HF's (it follows model.to(dtype)); [1]
        self.register_buffer("layer_scalar", torch.ones(1) if cfg.layer_scalar else None)
        self._apply_layer_scalar = self._scale_output if cfg.layer_scalar else self._no_scale
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        # TransformerLens's per-head attention inputs (off by default; one copy of resid_pre per head when on):
        self.hook_attn_in = HookPoint()  # [batch, pos, head_index, d_model] (use_attn_in; not with GQA)
        self.hook_q_input = HookPoint()  # [batch, pos, head_index, d_model] (use_split_qkv_input)
        self.hook_k_input = HookPoint()  # [batch, pos, kv_head_index, d_model] (use_split_qkv_input)
        self.hook_v_input = HookPoint()  # [batch, pos, kv_head_index, d_model] (use_split_qkv_input)
        self.use_attn_in = False
        self.use_split_qkv_input = False
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_in = HookPoint()  # [batch, pos, d_model]: ln2's input (only with use_hook_mlp_in)
        self.use_hook_mlp_in = False
        self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]
        if cfg.d_per_layer_input:  # Gemma 4 per-layer embeddings: a third residual sub-block
            self.ple = PerLayerInputBlock(cfg)
            self.hook_per_layer_input = HookPoint()  # [batch, pos, d_per_layer_input]: this block's PLE input
            self.hook_ple_out = HookPoint()  # [batch, pos, d_model]: what the PLE sub-block adds to the residual
            self._add_per_layer_input = self._add_per_layer
        else:
            self._add_per_layer_input = self._no_per_layer
        if cfg.n_streams > 1:  # AltUp (Gemma 3n): the block reads and writes all streams (components.streams)
            self.altup = AltUp(cfg)
            self.laurel = Laurel(cfg)
            self.hook_streams_pre = HookPoint()  # [stream, batch, pos, d_model]: the streams this block reads
            self.hook_laurel_out = HookPoint()  # [batch, pos, d_model]: LAuReL's output (its input included)
            self.hook_streams_post = HookPoint()  # [stream, batch, pos, d_model]: the streams it writes
            self.forward = self._forward_streams

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache_entry=None,
                per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        """`per_layer_input` [batch, pos, d_per_layer_input]: this block's slice of the per-layer embeddings
        (models with d_per_layer_input only)."""
        x = self._attention_sublayer(self.hook_resid_pre(x), ctx, cache_entry)
        x = self._mlp_sublayer(x)
        return self.hook_resid_post(self._apply_layer_scalar(self._add_per_layer_input(x, per_layer_input)))

    def _forward_streams(self, streams: torch.Tensor, ctx: ForwardContext, cache_entry=None,
                         per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        """Gemma3nTextDecoderLayer: predict the streams, compute on prediction 0 (attention and LAuReL beside it,
        (x + attn) + laurel over sqrt(2), then the MLP), correct every stream by the innovation, and add the
        per-layer sub-block, gated by corrected stream 0 (times correct_output_scale), to streams 1.. only.
        hook_resid_pre / hook_resid_post are stream 0 of the input / output and fire first (an edit replaces that
        stream); hook_streams_pre / _post then see the whole stack the block reads / writes, edits included."""
        streams = self.hook_streams_pre(self._stream0(streams, self.hook_resid_pre))
        predictions = self.altup(streams)
        active = predictions[0]
        a = self.ln1(active)
        laurel = self.hook_laurel_out(self.laurel(a))
        # TL's per-head inputs here are copies of what ln1 reads, AltUp's stream-0 prediction
        per_head = self._per_head_inputs(active) if self.use_attn_in or self.use_split_qkv_input else None
        attn_out = self.hook_attn_out(self.ln1_post(self.attn(a, ctx, cache_entry, per_head)))
        mid = self.hook_resid_mid(((active + attn_out) + laurel) / math.sqrt(2))
        mlp_in = self.hook_mlp_in(mid.clone()) if self.use_hook_mlp_in else mid
        output = mid + self.hook_mlp_out(self.ln2_post(self.mlp(self.ln2(mlp_in))))
        corrected, gate_input = self.altup(output, predictions)
        per_layer_input = self.hook_per_layer_input(per_layer_input.to(gate_input.device))
        added = self.hook_ple_out(self.ple(gate_input, per_layer_input))
        return self.hook_streams_post(self._stream0(self._add_to_streams(corrected, added), self.hook_resid_post))

    @staticmethod
    def _add_to_streams(corrected: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
        """The per-layer sub-block's output goes to streams 1.. only (HF: `corrected[1:] += ...`), in a new tensor
        (a fault, lens_det.parity.faults.per_layer_input_on_every_stream, swaps it)."""
        return torch.cat([corrected[:1], corrected[1:] + added], dim=0)

    @staticmethod
    def _stream0(streams: torch.Tensor, hook) -> torch.Tensor:
        """Fire `hook` on stream 0; an edit of it replaces stream 0 in a new stack (the others unchanged)."""
        first = streams[0]
        edited = hook(first)
        return streams if edited is first else torch.cat([edited[None], streams[1:]], dim=0)

    # Each sub-layer is its own function so that its temporaries (the norm's output, the branch's output) are freed
    # when it returns, as in HF's decoder layer: held in forward's frame, two [batch, pos, d_model] tensors stayed
    # alive through the MLP, the peak of a long prompt.
    def _attention_sublayer(self, x: torch.Tensor, ctx: ForwardContext, cache_entry) -> torch.Tensor:
        a = self.ln1(x)
        per_head = self._per_head_inputs(x) if self.use_attn_in or self.use_split_qkv_input else None
        attn_out = self.hook_attn_out(self.ln1_post(self.attn(a, ctx, cache_entry, per_head)))
        return self.hook_resid_mid((a if self.residual_from_norm else x) + attn_out)

    def _mlp_sublayer(self, x: torch.Tensor) -> torch.Tensor:
        # TL's hook_mlp_in: a copy of resid_mid that only the MLP branch reads, so an edit leaves the residual alone
        mlp_in = self.hook_mlp_in(x.clone()) if self.use_hook_mlp_in else x
        m = self.ln2(mlp_in)
        mlp_out = self.hook_mlp_out(self.ln2_post(self._feed_forward(m, mlp_in)))
        return (m if self.residual_from_norm else x) + mlp_out

    def _no_per_layer(self, x: torch.Tensor, per_layer_input) -> torch.Tensor:
        return x

    def _add_per_layer(self, x: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
        # HF: residual + post_per_layer_input_norm(per_layer_projection(act(per_layer_input_gate(h)) * ple_i))
        per_layer_input = self.hook_per_layer_input(per_layer_input.to(x.device))
        return x + self.hook_ple_out(self.ple(x, per_layer_input))

    def _dense(self, m: torch.Tensor, mlp_in: torch.Tensor) -> torch.Tensor:
        return self.mlp(m)

    def _dense_and_experts(self, m: torch.Tensor, mlp_in: torch.Tensor) -> torch.Tensor:
        """HF Gemma4TextDecoderLayer with enable_moe_block: the dense MLP reads ln2's output m, the experts read
        ln2_moe(mlp_in), the router reads _router_input(m, mlp_in)."""
        dense = self.hook_dense_mlp_out(self.ln2_dense_post(self.mlp(m)))
        experts = self.moe(self._router_input(m, mlp_in), self.ln2_moe(mlp_in))
        return dense + self.hook_moe_out(self.ln2_moe_post(experts))

    def _router_input(self, m: torch.Tensor, mlp_in: torch.Tensor) -> torch.Tensor:
        """What the MoE router reads: HF's un-normed residual mlp_in, not ln2's output m (a method so that a fault,
        lens_det.parity.faults.router_reads_normed_input, can swap it)."""
        return mlp_in

    def _no_scale(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _scale_output(self, x: torch.Tensor) -> torch.Tensor:
        # HF: `hidden_states *= self.layer_scalar` (docs/numerics.md §6.5), in place: computed in the promoted dtype,
        # stored in x's dtype. The same arithmetic out of place (differentiable, and no hook's tensor changes after).
        s = self.layer_scalar.to(x.device)
        return x * s if s.dtype == x.dtype else (x * s).to(x.dtype)

    def _per_head_inputs(self, x: torch.Tensor):
        """Fire TL's per-head input hooks on copies of resid_pre. Returns, for q, k and v, {head: ln1(its edited
        input)} for the heads whose input a hook changed (the attention recomputes only those; every other head
        keeps HF's fused projection of ln1's output, bit for bit), or None when nothing was edited."""
        cfg = self.attn.cfg

        def edits(hook, n_heads) -> dict[int, torch.Tensor]:
            original = x[:, :, None, :].expand(-1, -1, n_heads, -1)
            value = hook(original.clone())  # a real tensor: in-place edits (TL's patching idiom) must work
            changed = (value != original).flatten(3).any(-1).flatten(0, 1).any(0)  # per head; NaN counts
            return {h: self.ln1.normalize(value[:, :, h]) for h in changed.nonzero().flatten().tolist()}

        if self.use_attn_in:
            per_head = edits(self.hook_attn_in, cfg.n_heads)
            inputs = (per_head, per_head, per_head)
        else:
            n_kv = self.attn.n_kv_heads
            inputs = (edits(self.hook_q_input, cfg.n_heads), edits(self.hook_k_input, n_kv),
                      edits(self.hook_v_input, n_kv))
        return inputs if any(inputs) else None
