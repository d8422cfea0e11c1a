"""Gemma 4's mixture of experts (the routed branch that runs beside the dense MLP; docs/numerics.md §6.8).

The router reads the block's un-normed residual, the experts read it through their own pre-norm (the block owns
the norms). Experts are gated MLPs whose weights are 3-D tensors in HF's layout: `w_gate_up` [expert, 2 * d_mlp_expert,
d_model] (gate rows first, then up rows) and `w_out` [expert, d_model, d_mlp_expert].

HF runs the experts through `@use_experts_implementation`, and its implementations round differently, so lens_det
has both and `experts_implementation` picks one (HookedDecoder.experts_implementation, set from the HF model on
conversion; HF's default is "grouped_mm"):
  * "grouped_mm": tokens sorted by expert, two `torch.nn.functional.grouped_mm` calls over all experts, each
    (token, slot) output weighted in fp32, the k slots summed in fp32 and cast once.
  * "eager": a loop over the experts that were hit, one `F.linear` pair per expert on its tokens, each weighted
    output cast to the model dtype and `index_add_`-ed into a zero tensor in the dtype, in ascending expert order.
In deterministic mode neither runs: each expert's tokens go through `ops.linear` (batch-invariant), outputs are
weighted in fp32 and the k slots are added in slot order, then cast once (grouped_mm's kernel picks its blocking
from how many rows each expert got, so no row's bits could be independent of the batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lens_det import ops
from lens_det.components.hooks import HookPoint
from lens_det.components.mlp import ACTIVATIONS
from lens_det.components.norms import make_norm
from lens_det.config import LensConfig

EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "eager")
DEFAULT_EXPERTS_IMPLEMENTATION = "grouped_mm"  # what transformers picks when none is requested


class MixtureOfExperts(nn.Module):
    """Router plus experts. forward(resid, x) -> the experts' combined output [batch, pos, d_model] for router input
    `resid` (the block's residual) and expert input `x` (resid through the block's expert pre-norm)."""

    def __init__(self, cfg: LensConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.n_experts_per_token
        self.root_size = cfg.d_model**-0.5  # HF's scalar_root_size: a Python float
        self.act = ACTIVATIONS[cfg.act_fn]
        self.router_norm = make_norm(cfg, weight=False)  # HF router.norm (RMSNorm without a scale)
        self.w_router_scale = nn.Parameter(torch.ones(cfg.d_model))  # HF router.scale
        self.w_router = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))  # HF router.proj.weight
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.n_experts))
        self.w_gate_up = nn.Parameter(torch.empty(cfg.n_experts, 2 * cfg.d_mlp_expert, cfg.d_model))
        self.w_out = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, cfg.d_mlp_expert))
        self.implementation = DEFAULT_EXPERTS_IMPLEMENTATION
        self.hook_router_logits = HookPoint()  # [batch, pos, n_experts], model dtype
        self.hook_expert_weights = HookPoint()  # [batch, pos, n_experts], fp32 softmax of the logits (TL's name)
        self.hook_expert_indices = HookPoint()  # [batch, pos, n_experts_per_token], int64, by falling probability
        self.hook_top_k_weights = HookPoint()  # [batch, pos, n_experts_per_token], fp32: what each output is scaled by
        self.hook_out = HookPoint()  # [batch, pos, d_model]: the experts' combined output (before the block's post-norm)

    def forward(self, resid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.route(resid)
        experts = self._experts_function()
        flat = x.reshape(-1, x.shape[-1])
        out = experts(flat, indices.reshape(-1, self.top_k), weights.reshape(-1, self.top_k))
        return self.hook_out(out.view(x.shape))

    def route(self, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k weights fp32, top-k expert indices), each [batch, pos, k]: HF Gemma4TextRouter's ops in order."""
        h = self.router_norm(resid) * self.w_router_scale * self.root_size
        logits = self.hook_router_logits(ops.linear(h, self.w_router))
        probs = self.hook_expert_weights(ops.softmax_fp32(logits))  # HF: softmax(dtype=float32)
        top_w, top_i = torch.topk(probs, k=self.top_k, dim=-1)
        top_i = self.hook_expert_indices(top_i)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)  # renormalise over the chosen experts (fp32)
        return self.hook_top_k_weights(top_w * self.per_expert_scale[top_i]), top_i

    def _experts_function(self):
        if ops.is_deterministic():
            return self.experts_deterministic
        if self.implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation={self.implementation!r} is not implemented "
                             f"(supported: {', '.join(EXPERTS_IMPLEMENTATIONS)})")
        return self.experts_grouped_mm if self.implementation == "grouped_mm" else self.experts_eager

    def _gated(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)  # HF: gate rows first
        return self.act(gate) * up

    def experts_eager(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """HF's eager Gemma4TextExperts.forward: per expert hit (ascending), its tokens in (slot, token) order."""
        out = torch.zeros_like(x)
        mask = F.one_hot(top_i, num_classes=self.n_experts + 1).permute(2, 1, 0)  # [expert, slot, token]
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            if e == self.n_experts:
                continue
            slot, token = torch.where(mask[e])
            h = self._gated(F.linear(x[token], self.w_gate_up[e]))
            h = F.linear(h, self.w_out[e]) * top_w[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def experts_grouped_mm(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """HF's grouped_mm_experts_forward (transformers.integrations.moe) op for op, without expert parallelism."""
        n_tokens, k = top_i.shape
        expert_ids, perm = torch.sort(top_i.reshape(-1))
        rows = x[perm // k]
        sample_w = top_w.reshape(-1)[perm]
        # HF: histc over floats on CPU / MPS, over ints elsewhere
        ids = expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int()
        per_expert = torch.histc(ids, bins=self.n_experts, min=0, max=self.n_experts - 1)
        offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
        h = self._gated(_grouped_mm(rows, self.w_gate_up.transpose(-2, -1), offsets))
        h = _grouped_mm(h, self.w_out.transpose(-2, -1), offsets) * sample_w.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=x.device)
        return h[inv_perm].view(n_tokens, k, -1).sum(dim=1).to(x.dtype)

    def experts_deterministic(self, x: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """Batch-invariant experts: each expert's tokens through ops.linear, weighted in fp32, the k slots added in
        slot order, one cast (module docstring)."""
        n_tokens, k = top_i.shape
        slots = x.new_zeros(n_tokens, k, x.shape[-1], dtype=torch.float32)
        for e in torch.unique(top_i).tolist():
            token, slot = torch.where(top_i == e)
            h = self._gated(ops.linear(x[token], self.w_gate_up[e]))
            slots[token, slot] = ops.linear(h, self.w_out[e]) * top_w[token, slot, None]
        out = slots[:, 0]
        for j in range(1, k):
            out = out + slots[:, j]
        return out.to(x.dtype)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _can_use_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """HF's _can_use_grouped_mm (eager, not compiled): whether transformers calls torch's grouped GEMM here."""
    available = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")
    version = _torch_version()
    if weight.device.type == "cpu":
        unaligned = weight.data_ptr() % 16 != 0 or x.data_ptr() % 16 != 0
        return available and version > (2, 8) and not (version <= (2, 10) and unaligned)
    if weight.device.type == "cuda":
        capability = torch.cuda.get_device_capability(weight.device)
        if hasattr(F, "grouped_mm") or (hasattr(torch, "_grouped_mm") and version >= (2, 9)):
            return capability >= (8, 0)
        return hasattr(torch, "_grouped_mm") and capability[0] == 9
    return available


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """HF's _grouped_mm where it calls torch's grouped GEMM (F.grouped_mm, else torch._grouped_mm). Where
    transformers falls back to its own per-group loop (torch <= 2.8 on CPU, unaligned CPU tensors on torch <= 2.10,
    older GPUs) this is refused rather than approximated."""
    if not _can_use_grouped_mm(x, weight):
        raise NotImplementedError("experts_implementation='grouped_mm' where transformers falls back to its own "
                                  "per-group loop (old torch, unaligned CPU tensors or an older GPU) is not "
                                  "implemented; set experts_implementation='eager' on both models")
    fn = F.grouped_mm if hasattr(F, "grouped_mm") else torch._grouped_mm
    return fn(x.to(weight.dtype), weight, offs=offsets)
