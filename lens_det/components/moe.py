"""Gemma 4's mixture of experts (the routed branch that runs beside the dense MLP; docs/numerics.md §6.11).

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
weighted in fp32 and the k slots are added in slot order, then cast once (both HF implementations run GEMMs whose
shape is how many rows each expert got from the whole batch, so a row's bits depend on the other rows).

Hooks: the router's (logits, fp32 probabilities, chosen experts, their weights), per (token, slot) the chosen
expert's gate / up / act(gate) * up as `[batch, pos, k, d_mlp_expert]` (`hook_pre`, `hook_pre_linear`, `hook_post`;
fired on copies, so HF's tensors keep the layout that fixes their bits unless a hook edits them), and `hook_out`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lens_det import ops
from lens_det.hooks import HookPoint, is_hooked
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
        self.act = ops.ACTIVATIONS[cfg.act_fn]
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
        # Per (token, slot): the activations of the expert hook_expert_indices chose there, model dtype
        self.hook_pre = HookPoint()  # [batch, pos, n_experts_per_token, d_mlp_expert]: gate projection
        self.hook_pre_linear = HookPoint()  # [batch, pos, n_experts_per_token, d_mlp_expert]: up projection
        self.hook_post = HookPoint()  # [batch, pos, n_experts_per_token, d_mlp_expert]: act(gate) * up
        # [batch, pos, d_model]: the experts' combined output (before the block's post-norm)
        self.hook_out = HookPoint()

    def forward(self, resid: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        weights, indices = self.route(resid)
        return self.experts(x, weights, indices)

    def route(self, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top-k weights fp32, top-k expert indices), each [batch, pos, k]: HF Gemma4TextRouter's ops in order.
        Each step is its own method, so that a fault (lens_det.parity.faults) can replace one of them."""
        logits = self.hook_router_logits(self._router_logits(resid))
        probs = self.hook_expert_weights(self._probs(logits))
        top_w, top_i = torch.topk(probs, k=self.top_k, dim=-1)
        top_i = self.hook_expert_indices(top_i)
        return self.hook_top_k_weights(self._scale(self._renormalise(top_w), top_i)), top_i

    def _router_logits(self, resid: torch.Tensor) -> torch.Tensor:
        return ops.linear(self.router_norm(resid) * self.w_router_scale * self.root_size, self.w_router)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return ops.softmax_fp32(logits)  # HF: softmax(dtype=float32)

    def _renormalise(self, top_w: torch.Tensor) -> torch.Tensor:
        return top_w / top_w.sum(dim=-1, keepdim=True)  # over the chosen experts (fp32)

    def _scale(self, top_w: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        return top_w * self.per_expert_scale[top_i]  # the learned per-expert scale of the chosen experts

    def experts(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The experts' combined output [batch, pos, d_model] for input x, as HF flattens it to [batch * pos, d]."""
        if ops.is_deterministic():
            fn = self.experts_deterministic
        elif self.implementation == "grouped_mm":
            fn = self.experts_grouped_mm
        elif self.implementation == "eager":
            fn = self.experts_eager
        else:
            raise ValueError(f"experts_implementation={self.implementation!r} is not implemented "
                             f"(supported: {', '.join(EXPERTS_IMPLEMENTATIONS)})")
        flat = x.reshape(-1, x.shape[-1])
        out = fn(flat, indices.reshape(-1, self.top_k), weights.reshape(-1, self.top_k), x.shape[:-1])
        return self.hook_out(out.view(x.shape))

    # --- per-(token, slot) activations: hook_pre / hook_pre_linear / hook_post ---
    def _fire(self, hook: HookPoint, groups: list, values: list, lead: torch.Size) -> list:
        """Fire `hook` on [batch, pos, k, width], assembled from `values[g]`, the rows of group g at
        (token, slot) = groups[g]. The computation keeps using HF's own tensors (their layout fixes the bits of the
        elementwise ops that follow) unless the hook changed a value; then each group reads the edited rows. Under
        autograd an unedited value still passes through the hook's output, as value + (output - copy), which adds an
        exact 0 in the forward and routes the gradient through the hook (a backward hook or retain_grad sees it)."""
        if not is_hooked(hook):
            return values
        full = values[0].new_zeros(lead.numel(), self.top_k, values[0].shape[-1])
        for (token, slot), value in zip(groups, values):
            full[token, slot] = value
        original = full.clone()
        edited = hook(full.view(*lead, self.top_k, -1)).reshape(full.shape)
        if not torch.equal(edited, original):
            return [edited[token, slot] for token, slot in groups]
        if edited.requires_grad:
            return [value + (edited[token, slot] - original[token, slot])
                    for (token, slot), value in zip(groups, values)]
        return values

    def _gated(self, gate_up: list, groups: list, lead: torch.Size) -> list:
        """act(gate) * up per group, from each group's gate_up rows (HF: gate rows first, chunk(2)), with hooks."""
        halves = [h.chunk(2, dim=-1) for h in gate_up]
        gates = self._fire(self.hook_pre, groups, [g for g, _ in halves], lead)
        ups = self._fire(self.hook_pre_linear, groups, [u for _, u in halves], lead)
        return self._fire(self.hook_post, groups, [self.act(g) * u for g, u in zip(gates, ups)], lead)

    def _expert_groups(self, top_i: torch.Tensor, experts) -> list:
        """[(expert, token, slot)] for each expert in `experts`: HF eager's (slot, token) order."""
        mask = F.one_hot(top_i, num_classes=self.n_experts + 1).permute(2, 1, 0)  # [expert, slot, token]
        return [(e, *reversed(torch.where(mask[e]))) for e in experts]

    def experts_eager(self, x, top_i, top_w, lead) -> torch.Tensor:
        """HF's eager Gemma4TextExperts.forward: per expert hit (ascending), its tokens in (slot, token) order,
        each weighted output cast to the dtype and index_add_-ed. The loop is split in phases so that the per-slot
        hooks see every expert; each op runs on the same tensors as HF's."""
        hit = torch.greater(F.one_hot(top_i, self.n_experts + 1).sum(dim=(0, 1)), 0).nonzero()[:, 0].tolist()
        groups = self._expert_groups(top_i, [e for e in hit if e != self.n_experts])
        where = [(token, slot) for _, token, slot in groups]
        h = self._gated([ops.linear(x[token], self.w_gate_up[e]) for e, token, _ in groups], where, lead)
        out = torch.zeros_like(x)
        for (e, token, slot), h_e in zip(groups, h):
            y = ops.linear(h_e, self.w_out[e]) * top_w[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def experts_grouped_mm(self, x, top_i, top_w, lead) -> torch.Tensor:
        """HF's grouped_mm_experts_forward (transformers.integrations.moe) op for op, without expert parallelism."""
        n_tokens, k = top_i.shape
        expert_ids, perm = torch.sort(top_i.reshape(-1))
        rows = x[perm // k]
        sample_w = top_w.reshape(-1)[perm]
        # HF: histc over floats on CPU / MPS, over ints elsewhere
        ids = expert_ids.float() if x.device.type in ("cpu", "mps") else expert_ids.int()
        per_expert = torch.histc(ids, bins=self.n_experts, min=0, max=self.n_experts - 1)
        offsets = torch.cumsum(per_expert, dim=0, dtype=torch.int32)
        where = [(perm // k, perm % k)]  # one group: the sorted rows
        (h,) = self._gated([_grouped_mm(rows, self.w_gate_up.transpose(-2, -1), offsets)], where, lead)
        h = _grouped_mm(h, self.w_out.transpose(-2, -1), offsets) * sample_w.unsqueeze(-1)
        inv_perm = torch.empty_like(perm)
        inv_perm[perm] = torch.arange(perm.size(0), device=x.device)
        return h[inv_perm].view(n_tokens, k, -1).sum(dim=1).to(x.dtype)

    def experts_deterministic(self, x, top_i, top_w, lead) -> torch.Tensor:
        """Batch-invariant experts: each expert's rows through ops.linear, weighted in fp32, the k slots added in
        slot order, one cast (module docstring)."""
        n_tokens, k = top_i.shape
        groups = self._expert_groups(top_i, torch.unique(top_i).tolist())
        where = [(token, slot) for _, token, slot in groups]
        h = self._gated([ops.linear(x[token], self.w_gate_up[e]) for e, token, _ in groups], where, lead)
        slots = x.new_zeros(n_tokens, k, x.shape[-1], dtype=torch.float32)
        for (e, token, slot), h_e in zip(groups, h):
            slots[token, slot] = ops.linear(h_e, self.w_out[e]) * top_w[token, slot, None]
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
