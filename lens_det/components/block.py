"""One decoder block; norms that a config lacks are identities, so forward has no architecture branches."""

from __future__ import annotations

import torch
from torch import nn
from lens_det.hooks import HookPoint

from lens_det.components.attention import Attention
from lens_det.components.context import ForwardContext
from lens_det.components.mlp import make_mlp
from lens_det.components.moe import MixtureOfExperts
from lens_det.components.norms import make_norm, make_optional_norm
from lens_det.components.per_layer import PerLayerInputBlock
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

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cache_entry=None,
                per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        """`per_layer_input` [batch, pos, d_per_layer_input]: this block's slice of the per-layer embeddings
        (models with d_per_layer_input only)."""
        x = self._attention_sublayer(self.hook_resid_pre(x), ctx, cache_entry)
        x = self._mlp_sublayer(x)
        return self.hook_resid_post(self._apply_layer_scalar(self._add_per_layer_input(x, per_layer_input)))

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
