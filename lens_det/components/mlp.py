"""MLPs: Bloom's (in -> bloom_gelu -> out, with biases) and Gemma's gated GELU (down(act(gate) * up)), with the
tanh or the exact erf GELU as the HF config names it."""

from __future__ import annotations

import torch
from torch import nn
from lens_det.hooks import HookPoint

from lens_det import ops
from lens_det.config import LensConfig
from lens_det.ops import ACTIVATIONS, bloom_gelu  # noqa: F401  (moved to lens_det.ops; re-exported here)


class MLP(nn.Module):
    def __init__(self, cfg: LensConfig, d_mlp: int | None = None):
        super().__init__()
        d_mlp = cfg.d_mlp if d_mlp is None else d_mlp  # this layer's width (cfg.layer_d_mlp)
        self.act = ACTIVATIONS[cfg.act_fn]
        self.w_in = nn.Parameter(torch.empty(d_mlp, cfg.d_model))
        self.b_in = nn.Parameter(torch.zeros(d_mlp)) if cfg.mlp_bias else None
        self.w_out = nn.Parameter(torch.empty(cfg.d_model, d_mlp))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.mlp_bias else None
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(ops.linear(x, self.w_in, self.b_in))
        return ops.linear(self.hook_post(self.act(pre)), self.w_out, self.b_out)

    @property
    def W_in(self):  # [d_model, d_mlp]
        return self.w_in.T

    @property
    def W_out(self):  # [d_mlp, d_model]
        return self.w_out.T

class GatedMLP(MLP):
    def __init__(self, cfg: LensConfig, d_mlp: int | None = None):
        super().__init__(cfg, d_mlp)
        d_mlp = self.w_in.shape[0]
        self.w_gate = nn.Parameter(torch.empty(d_mlp, cfg.d_model))
        self.b_gate = nn.Parameter(torch.zeros(d_mlp)) if cfg.mlp_bias else None
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.sparsity = 0.0  # gaussian top-k of the gate (Gemma 3n's activation_sparsity; set by make_mlp)

    def _sparsify(self, gate: torch.Tensor) -> torch.Tensor:
        """HF's _gaussian_topk: relu(g - (mean + std * icdf(p))), std without Bessel's correction, the icdf in
        float32 on g's device then cast to g's dtype; layers with sparsity 0 skip it."""
        if not self.sparsity:
            return gate
        p = torch.tensor(self.sparsity, dtype=torch.float32, device=gate.device)
        multiplier = torch.distributions.normal.Normal(0, 1).icdf(p).type(gate.dtype)
        mean = torch.mean(gate, dim=-1, keepdim=True)
        return self.hook_sparse_gate(torch.relu(gate - (mean + self._std(gate) * multiplier)))

    @staticmethod
    def _std(gate: torch.Tensor) -> torch.Tensor:
        """The population std (no Bessel correction), as HF (a fault, lens_det.parity.faults.gate_std_unbiased,
        swaps it)."""
        return torch.std(gate, dim=-1, keepdim=True, unbiased=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's order, act(gate_proj(x)) * up_proj(x): the gate's pre-activation is freed before up_proj runs, so the
        # peak holds three [pos, d_mlp] tensors, not four (+1 x T x d_mlp at long prompts otherwise)
        gate = self.act(self._sparsify(self.hook_pre(ops.linear(x, self.w_gate, self.b_gate))))
        pre_linear = self.hook_pre_linear(ops.linear(x, self.w_in, self.b_in))
        return ops.linear(self.hook_post(gate * pre_linear), self.w_out, self.b_out)

    @property
    def W_gate(self):  # [d_model, d_mlp]
        return self.w_gate.T


def make_mlp(cfg: LensConfig, layer: int = 0) -> MLP:
    """Layer `layer`'s MLP, cfg.layer_d_mlp(layer) wide (hooks: [batch, pos, that width])."""
    mlp = (GatedMLP if cfg.gated_mlp else MLP)(cfg, cfg.layer_d_mlp(layer))
    if cfg.gate_sparsity and cfg.gate_sparsity[layer]:
        mlp.sparsity = cfg.gate_sparsity[layer]
        mlp.hook_sparse_gate = HookPoint()  # [batch, pos, d_mlp]: the gate after the sparsification (these layers)
    return mlp
