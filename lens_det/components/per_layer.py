"""Per-layer embeddings (Gemma 4 E2B / E4B "PLE", docs/numerics.md §6.8): every block gets its own small input,
made once per forward from the tokens and the embedding, which gates a third residual sub-block at the block's end.

HF: Gemma4TextModel.get_per_layer_inputs / project_per_layer_inputs and the end of Gemma4TextDecoderLayer.forward;
the op order and dtypes here are HF's (python-float scales multiply in the model dtype, RMSNorm in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lens_det import ops
from lens_det.components.norms import make_norm
from lens_det.components.scales import EmbedScale
from lens_det.hooks import HookPoint
from lens_det.config import LensConfig


class PerLayerEmbed(nn.Module):
    """tokens, embedding -> per-layer inputs [batch, pos, n_layers, d_per_layer_input]:

    tokens_part = W_E[tokens] * sqrt(d_ple) (cast to the weight dtype first, as the main embedding),
    proj_part = RMSNorm(reshape(embedding @ w_proj^T * d_model**-0.5)), combined (proj_part + tokens_part) * 2**-0.5.
    """

    def __init__(self, cfg: LensConfig):
        super().__init__()
        self.n_layers, self.d = cfg.n_layers, cfg.d_per_layer_input
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab_per_layer_input, cfg.n_layers * self.d))
        self.scale = EmbedScale(self.d)
        self.w_proj = nn.Parameter(torch.empty(cfg.n_layers * self.d, cfg.d_model))
        self.proj_scale = cfg.d_model**-0.5  # python floats, as HF's per_layer_model_projection_scale
        self.combine_scale = 2.0**-0.5  # HF's per_layer_input_scale
        self.oov_to_zero = cfg.d_vocab_per_layer_input if cfg.per_layer_oov_to_zero else None
        pad = cfg.embed_padding_idx  # HF builds the per-layer table with the main embedding's padding_idx
        self.padding_idx = pad if pad is not None and pad < cfg.d_vocab_per_layer_input else None
        # Gemma 3n: float32 buffers tensor(d ** -0.5) and rsqrt(tensor(2.)) cast with the model (rounded to its dtype)
        self.scale_tensors = (torch.tensor(cfg.d_model**-0.5, dtype=torch.float32, device="cpu"),
                              torch.rsqrt(torch.tensor(2.0, dtype=torch.float32, device="cpu"))) \
            if cfg.scales_in_model_dtype else None
        self.ln = make_norm(cfg, dim=self.d)
        self.hook_tokens = HookPoint()  # [batch, pos, n_layers, d_per_layer_input]: the scaled token table rows
        self.hook_proj = HookPoint()  # [batch, pos, n_layers, d_per_layer_input]: the projection, before ln

    def forward(self, tokens: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        shape = (*tokens.shape, self.n_layers, self.d)
        if self.oov_to_zero is not None:  # Gemma 3n: ids outside the per-layer table read its row 0
            tokens = torch.where((tokens >= 0) & (tokens < self.oov_to_zero), tokens, 0)
        table = self.hook_tokens(self.scale(F.embedding(tokens, self.W_E, padding_idx=self.padding_idx)).reshape(shape))
        proj_scale, combine_scale = (self.proj_scale, self.combine_scale) if self.scale_tensors is None else \
            (t.to(embedding.device, embedding.dtype) for t in self.scale_tensors)
        proj = self.hook_proj((ops.linear(embedding, self.w_proj) * proj_scale).reshape(shape))
        return (self.ln(proj) + table) * combine_scale


class PerLayerInputBlock(nn.Module):
    """The block's third residual sub-block: out = ln(w_out @ (act(w_gate @ h) * per_layer_input)); the block adds
    it to the residual stream h (after the MLP's add, before layer_scalar)."""

    def __init__(self, cfg: LensConfig):
        super().__init__()
        self.act = ops.ACTIVATIONS[cfg.act_fn]  # HF: ACT2FN[hidden_activation], the MLP's activation
        self.w_gate = nn.Parameter(torch.empty(cfg.d_per_layer_input, cfg.d_model))
        self.w_out = nn.Parameter(torch.empty(cfg.d_model, cfg.d_per_layer_input))
        self.ln = make_norm(cfg)
        self.hook_pre = HookPoint()  # [batch, pos, d_per_layer_input]: the gate projection (per_layer_input_gate)
        self.hook_post = HookPoint()  # [batch, pos, d_per_layer_input]: act(gate) * per_layer_input

    def forward(self, h: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
        gate = self.hook_pre(ops.linear(h, self.w_gate))
        return self.ln(ops.linear(self.hook_post(self.act(gate) * per_layer_input), self.w_out))
