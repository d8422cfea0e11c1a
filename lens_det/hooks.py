"""Hook points and the one registry of hook kinds.

`HookPoint` is TransformerLens's HookPoint with one check: a hook's edit must keep the shape, dtype and device it
was given. Another edit would otherwise fail later inside torch (or broadcast or promote silently) far from the
hook that caused it.

`HOOK_KINDS` holds, for every kind of hook point a lens_det model declares, its layout (the names of its axes,
from which the position, key-position and head axes follow), the op that computes it, where its Hugging Face
reference comes from, the call that makes it fire if it is off by default, and the weight-processing steps that
change its meaning. The parity report, the reference capture's `SOURCES`, patching, determinism and generation read
it; tests/hooks/test_hook_registry.py checks that it matches what every family declares and computes. A new hook point
is one entry here. Keys are hook names without the layer index: "blocks.attn.hook_q" for "blocks.{i}.attn.hook_q",
and model-level names as they are ("hook_embed"); `kind_of` in lens_det.parity.report drops "blocks.{i}." for
display.

Axis names: batch, pos (query positions), key_pos, head (query heads), kv_head (key/value heads), layer (one slot
per decoder layer), expert, top_k (the experts a token is routed to), one (a kept size-1 axis), and the widths
d_model, d_head, d_mlp, d_expert, d_ple (Gemma 4's per-layer input width), d_vocab, and an SAE's d_in, d_sae, d_out;
Gemma 3n adds stream / stream_from (AltUp's residual streams; a stream stack's batch axis is 1) and d_laurel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformer_lens.hook_points import HookPoint as _HookPoint


@dataclass(frozen=True)
class HookKind:
    key: str  # the hook name with "blocks.{i}." written "blocks." (model-level names unchanged)
    layout: tuple[str, ...]  # axis names of the activation, batched
    op: str  # the op that computes it: the first differing hook names the op that broke
    source: str  # how its HF reference is obtained (lens_det.parity.reference)
    opt_in: str | None = None  # the call that makes it fire (None: it always fires)
    opt_in_flag: str | None = None  # the block attribute that call sets (dotted path from the block)
    invalidated_by: tuple[str, ...] = ()  # weight-processing steps after which it means something else

    @property
    def pos_axis(self) -> int:
        return self.layout.index("pos")

    @property
    def key_axis(self) -> int | None:
        return self.layout.index("key_pos") if "key_pos" in self.layout else None

    @property
    def head_axis(self) -> int | None:
        """The query-head or key/value-head axis, None for a hook without heads."""
        return next((i for i, axis in enumerate(self.layout) if axis in ("head", "kv_head")), None)

    @property
    def position_axes(self) -> tuple[int, ...]:
        """The axes whose size depends on how many tokens a call runs (query and key positions)."""
        return tuple(i for i, axis in enumerate(self.layout) if axis in ("pos", "key_pos"))


_RESID = ("batch", "pos", "d_model")
_STREAMS = ("stream", "batch", "pos", "d_model")  # AltUp's residual streams (Gemma 3n)
_SCALE = "derived: sqrt(var + eps) of the HF norm module's input"
_NORMED = "module: the HF norm module's output"
_PER_HEAD_INPUT = ("module: the HF decoder layer's input (Gemma 3n: input_layernorm's), repeated per {} (only with "
                   "set_use_{})")
_SLOT = "placed at each row's (token, slot) by HF's own indexing"
_SPLIT_QKV = ("model.set_use_split_qkv_input(True)", "use_split_qkv_input")


def _norm(prefix: str, layout: tuple[str, ...], invalidated_by: tuple[str, ...] = ()) -> list[HookKind]:
    """A norm's two hooks: hook_scale (the divisor, the last axis kept as size 1) and hook_normalized."""
    return [HookKind(f"{prefix}.hook_scale", (*layout[:-1], "one"), "norm", _SCALE),
            HookKind(f"{prefix}.hook_normalized", layout, "norm", _NORMED, invalidated_by=invalidated_by)]


_ENTRIES = [
    # model level, before the blocks
    HookKind("hook_embed", _RESID, "embedding",
             "module: the embedding LayerNorm's output (Bloom) / the scaled embedding's output (Gemma)",
             invalidated_by=("center_writing_weights",)),
    *_norm("embed.ln", _RESID),  # Bloom's embedding LayerNorm
    # Gemma 4 per-layer embeddings (PLE); model.ple is PerLayerEmbed, blocks.{i}.ple is PerLayerInputBlock
    HookKind("ple.hook_tokens", ("batch", "pos", "layer", "d_ple"), "embedding (per-layer table)",
             "module: embed_tokens_per_layer's output (the scaled packed table), reshaped per layer"),
    HookKind("ple.hook_proj", ("batch", "pos", "layer", "d_ple"), "linear (per-layer projection)",
             "module: the input of per_layer_projection_norm (projection * d_model**-0.5, reshaped)"),
    *_norm("ple.ln", ("batch", "pos", "layer", "d_ple")),
    HookKind("hook_per_layer_inputs", ("batch", "pos", "layer", "d_ple"), "per-layer combine",
             "module: the return value of the text model's project_per_layer_inputs"),
    # each block, in firing order
    HookKind("blocks.hook_resid_pre", _RESID, "residual add", "module: the HF decoder layer's input",
             invalidated_by=("center_writing_weights",)),
    HookKind("blocks.hook_attn_in", ("batch", "pos", "head", "d_model"), "copy of resid_pre per head",
             _PER_HEAD_INPUT.format("head", "attn_in"), "model.set_use_attn_in(True)", "use_attn_in"),
    HookKind("blocks.hook_q_input", ("batch", "pos", "head", "d_model"), "copy of resid_pre per head",
             _PER_HEAD_INPUT.format("head", "split_qkv_input"), *_SPLIT_QKV),
    HookKind("blocks.hook_k_input", ("batch", "pos", "kv_head", "d_model"), "copy of resid_pre per kv head",
             _PER_HEAD_INPUT.format("kv head", "split_qkv_input"), *_SPLIT_QKV),
    HookKind("blocks.hook_v_input", ("batch", "pos", "kv_head", "d_model"), "copy of resid_pre per kv head",
             _PER_HEAD_INPUT.format("kv head", "split_qkv_input"), *_SPLIT_QKV),
    *_norm("blocks.ln1", _RESID, ("fold_ln",)),
    HookKind("blocks.attn.hook_q", ("batch", "pos", "head", "d_head"), "linear",
             "module: q_proj / fused query_key_value output, split per head",
             invalidated_by=("refactor_factored_attn_matrices",)),
    HookKind("blocks.attn.hook_k", ("batch", "pos", "kv_head", "d_head"), "linear",
             "module: k_proj / fused query_key_value output, split per head",
             invalidated_by=("refactor_factored_attn_matrices",)),
    HookKind("blocks.attn.hook_v", ("batch", "pos", "kv_head", "d_head"), "linear",
             "module: v_proj / fused query_key_value output, split per head (K = V layers: k_proj's output)",
             invalidated_by=("fold_value_biases", "refactor_factored_attn_matrices")),
    *_norm("blocks.attn.q_norm", ("batch", "pos", "head", "d_head")),
    *_norm("blocks.attn.k_norm", ("batch", "pos", "kv_head", "d_head")),
    *_norm("blocks.attn.v_norm", ("batch", "pos", "kv_head", "d_head")),
    HookKind("blocks.attn.hook_rot_q", ("batch", "pos", "head", "d_head"), "rope",
             "attention: the query HF's attention function (eager or sdpa) receives"),
    HookKind("blocks.attn.hook_rot_k", ("batch", "pos", "kv_head", "d_head"), "rope",
             "attention: the new keys HF's attention function (eager or sdpa) receives"),
    HookKind("blocks.attn.hook_attn_scores", ("batch", "head", "pos", "key_pos"), "attention_scores",
             "attention/derived: HF's eager score ops (Bloom: baddbmm with HF's build_alibi_tensor); none under sdpa"),
    HookKind("blocks.attn.hook_pattern", ("batch", "head", "pos", "key_pos"), "softmax",
             "attention: the weights HF's eager attention returns (Bloom: output_attentions); none under sdpa"),
    HookKind("blocks.attn.hook_z", ("batch", "pos", "head", "d_head"), "attend",
             "module: the input of o_proj / dense, split per head",
             invalidated_by=("fold_value_biases", "refactor_factored_attn_matrices")),
    HookKind("blocks.attn.hook_result", ("batch", "pos", "head", "d_model"), "linear (per head)",
             "derived: hook_z reference times the o_proj weight per head", "model.set_use_attn_result(True)",
             "attn.use_attn_result",
             ("center_writing_weights", "fold_value_biases", "refactor_factored_attn_matrices")),
    *_norm("blocks.ln1_post", _RESID),
    HookKind("blocks.hook_attn_out", _RESID, "linear (o_proj) / norm",
             "module: o_proj/dense output (Gemma 2/3/4: the post-attention norm's output)",
             invalidated_by=("center_writing_weights",)),
    HookKind("blocks.hook_resid_mid", _RESID, "residual add", "module: the input of the HF pre-MLP norm",
             invalidated_by=("center_writing_weights",)),
    HookKind("blocks.hook_mlp_in", _RESID, "copy of resid_mid",
             "module: the input of the HF pre-MLP norm (only with set_use_hook_mlp_in)",
             "model.set_use_hook_mlp_in(True)", "use_hook_mlp_in", ("center_writing_weights",)),
    *_norm("blocks.ln2", _RESID, ("fold_ln",)),
    HookKind("blocks.mlp.hook_pre", ("batch", "pos", "d_mlp"), "linear", "module: gate_proj / dense_h_to_4h output"),
    HookKind("blocks.mlp.hook_pre_linear", ("batch", "pos", "d_mlp"), "linear", "module: up_proj output"),
    HookKind("blocks.mlp.hook_post", ("batch", "pos", "d_mlp"), "activation",
             "module: the input of down_proj / dense_4h_to_h"),
    *_norm("blocks.ln2_post", _RESID),
    # Gemma 4's MoE block (HF runs the router and experts on [batch * pos, ...]; references are viewed as
    # [batch, pos, ...])
    *_norm("blocks.ln2_dense_post", _RESID),
    HookKind("blocks.hook_dense_mlp_out", _RESID, "linear (down) / norm",
             "module: post_feedforward_layernorm_1's output (the dense branch)"),
    *_norm("blocks.moe.router_norm", _RESID),
    HookKind("blocks.moe.hook_router_logits", ("batch", "pos", "expert"), "linear (router)",
             "module: router.proj's output"),
    HookKind("blocks.moe.hook_expert_weights", ("batch", "pos", "expert"), "softmax (router)",
             "module: the router's first output (router_probabilities, fp32 softmax)"),
    HookKind("blocks.moe.hook_expert_indices", ("batch", "pos", "top_k"), "top-k (router)",
             "module: the router's third output (top_k_index)"),
    HookKind("blocks.moe.hook_top_k_weights", ("batch", "pos", "top_k"), "renormalise, per-expert scale (router)",
             "module: the router's second output (top_k_weights, renormalised, per-expert scaled)"),
    *_norm("blocks.ln2_moe", _RESID),
    HookKind("blocks.moe.hook_pre", ("batch", "pos", "top_k", "d_expert"), "linear",
             "call: the gate half of the first GEMM's output inside HF's experts (eager: F.linear per expert, "
             f"grouped_mm: the first grouped GEMM), {_SLOT}"),
    HookKind("blocks.moe.hook_pre_linear", ("batch", "pos", "top_k", "d_expert"), "linear",
             f"call: the up half of that GEMM's output, {_SLOT}"),
    HookKind("blocks.moe.hook_post", ("batch", "pos", "top_k", "d_expert"), "activation",
             f"call: the input of the second GEMM inside HF's experts (act(gate) * up), {_SLOT}"),
    HookKind("blocks.moe.hook_out", _RESID, "linear (experts' down), weighted sum",
             "module: the experts module's output (HF's chosen experts implementation)"),
    *_norm("blocks.ln2_moe_post", _RESID),
    HookKind("blocks.hook_moe_out", _RESID, "norm", "module: post_feedforward_layernorm_2's output (the MoE branch)"),
    HookKind("blocks.hook_mlp_out", _RESID, "linear (down) / norm",
             "module: the MLP down projection's output (Gemma 2/3/4: the post-feedforward norm's output)",
             invalidated_by=("center_writing_weights",)),
    # Gemma 4's per-layer input, after the MLP
    HookKind("blocks.hook_per_layer_input", ("batch", "pos", "d_ple"), "slice of per-layer inputs",
             "module: the per_layer_input argument of the HF decoder layer"),
    HookKind("blocks.ple.hook_pre", ("batch", "pos", "d_ple"), "linear", "module: per_layer_input_gate's output"),
    HookKind("blocks.ple.hook_post", ("batch", "pos", "d_ple"), "activation",
             "module: the input of per_layer_projection"),
    *_norm("blocks.ple.ln", _RESID),
    HookKind("blocks.hook_ple_out", _RESID, "linear (per-layer projection) / norm",
             "module: post_per_layer_input_norm's output"),
    HookKind("blocks.hook_resid_post", _RESID, "residual add",
             "module: the HF decoder layer's output (Gemma 4: after its in-place layer_scalar multiply)",
             invalidated_by=("center_writing_weights",)),
    # AltUp streams and LAuReL (Gemma 3n; components/streams.py): [stream, batch, pos, d_model] stacks
    HookKind("streams_in.hook_streams", _STREAMS, "projection, magnitude match",
             "module: the first HF decoder layer's input (the stacked streams)"),
    HookKind("blocks.hook_streams_pre", _STREAMS, "altup correct (previous block)",
             "module: the HF decoder layer's input"),
    HookKind("blocks.altup.hook_predict_coefs", ("batch", "pos", "stream", "stream_from"), "linear (router)",
             "module: altup.prediction_coefs's output, reshaped [.., S, S]"),
    HookKind("blocks.altup.hook_predictions", _STREAMS, "matmul (stream mix)", "call: altup.predict's return"),
    HookKind("blocks.laurel.hook_low", ("batch", "pos", "d_laurel"), "linear", "module: laurel.linear_left's output"),
    *_norm("blocks.laurel.ln", _RESID),
    HookKind("blocks.hook_laurel_out", _RESID, "residual add", "module: the laurel block's output"),
    HookKind("blocks.mlp.hook_sparse_gate", ("batch", "pos", "d_mlp"), "gaussian top-k",
             "module: the MLP act_fn's input (sparse layers only)"),
    HookKind("blocks.altup.hook_correct_coefs", ("batch", "pos", "stream"), "linear (router) + 1",
             "derived: altup.correction_coefs's output + 1.0"),
    HookKind("blocks.altup.hook_innovation", _RESID, "subtract",
             "derived: HF's (pre_feedforward_layernorm input + post_feedforward_layernorm output) - prediction 0"),
    HookKind("blocks.altup.hook_corrected", _STREAMS, "altup correct", "call: altup.correct's return (cloned)"),
    HookKind("blocks.hook_streams_post", _STREAMS, "per-layer add (streams 1..)",
             "module: the HF decoder layer's output"),
    HookKind("streams_out.hook_streams", _STREAMS, "projection, magnitude match",
             "derived: HF's collapse ops on the last layer's output and altup_unembed_projections' outputs"),
    HookKind("streams_out.hook_mean", _RESID, "mean over streams", "module: the final norm's input"),
    # model level, after the blocks
    *_norm("ln_final", _RESID, ("fold_ln",)),
]
_SAE = "none: lens_det's spliced SAE (lens_det.sae), no HF counterpart"
# An SAE's hook points, under the hook it reads ("blocks.3.hook_resid_post.hook_sae_acts_post"); attn.hook_z's heads
# arrive concatenated (d_in = n_heads * d_head)
_ENTRIES += [
    HookKind("sae.hook_sae_input", ("batch", "pos", "d_in"), "cast (SAE dtype)", _SAE),
    HookKind("sae.hook_sae_acts_pre", ("batch", "pos", "d_sae"), "linear (SAE encoder)", _SAE),
    HookKind("sae.hook_sae_acts_post", ("batch", "pos", "d_sae"), "SAE activation (relu / jumprelu / topk)", _SAE),
    HookKind("sae.hook_sae_recons", ("batch", "pos", "d_out"), "linear (SAE decoder)", _SAE),
    HookKind("sae.hook_sae_error", ("batch", "pos", "d_out"), "activation - clean reconstruction", _SAE),
    HookKind("sae.hook_sae_output", ("batch", "pos", "d_out"), "what flows on at the SAE's output hook", _SAE),
]
HOOK_KINDS: dict[str, HookKind] = {kind.key: kind for kind in _ENTRIES}

# Outputs the parity report and the invariance checks compare beside the hook points (no HookPoint).
OUTPUT_KINDS: dict[str, HookKind] = {
    "logits": HookKind("logits", ("batch", "pos", "d_vocab"), "linear (unembed)", "the HF model's logits",
                       invalidated_by=("center_unembed",)),
    "log_probs": HookKind("log_probs", ("batch", "pos", "d_vocab"), "linear (unembed), log_softmax",
                          "log_softmax of the HF model's logits"),
}

# The last name component of the [batch, head, query_pos, key_pos] hooks, for `name.endswith(QUERY_KEY_HOOKS)`.
QUERY_KEY_HOOKS = tuple(dict.fromkeys(k.key.rsplit(".", 1)[-1] for k in _ENTRIES if k.key_axis is not None))


def registry_key(name: str) -> str:
    """The `HOOK_KINDS` key of a hook name: "blocks.3.attn.hook_q" -> "blocks.attn.hook_q" (keys pass through)."""
    if ".hook_sae_" in name:  # an SAE's hook point, under the hook it reads
        return "sae." + name.rsplit(".", 1)[-1]
    return re.sub(r"^blocks\.\d+\.", "blocks.", name)


def hook_kind(name: str) -> HookKind:
    """The registry entry of a hook point or compared output, by its name (any layer) or its key."""
    key = registry_key(name)
    kind = HOOK_KINDS.get(key) or OUTPUT_KINDS.get(key)
    if kind is None:
        raise KeyError(f"{name!r} is no lens_det hook point: a new hook point needs its entry in "
                       "lens_det.hooks.HOOK_KINDS (its layout, op, HF source, opt-in switch)")
    return kind


def position_dim(name: str) -> int:
    """The position axis (query positions) of a hook's activation in its batched layout."""
    return hook_kind(name).pos_axis


def opt_in_switch(name: str) -> str | None:
    """The call that makes a hook point fire ("model.set_use_attn_result(True)"), None if it always fires."""
    return hook_kind(name).opt_in


def invalidated_kinds(processing) -> dict[str, str]:
    """{hook kind as `kind_of` writes it (no "blocks.{i}."): the first step of `processing` that changes its
    meaning}, the registry's view of lens_det.weight_processing.changed_hooks."""
    changed: dict[str, str] = {}
    for step in processing:
        for kind in (*_ENTRIES, *OUTPUT_KINDS.values()):
            if step in kind.invalidated_by:
                changed.setdefault(kind.key.removeprefix("blocks."), step)
    return changed


def is_hooked(hook: _HookPoint) -> bool:
    """Whether a forward or backward hook is attached (TransformerLens adds a backward hook as the module's full
    backward hook), so that a value computed only for hooks is worth computing and must be on the graph."""
    return bool(hook._forward_hooks or hook._backward_hooks)


def check_edit(name: str, given: torch.Tensor, edited) -> None:
    """Refuse a hook's edit that does not keep the shape, dtype and device it was given (None and the given tensor
    itself pass), with the fix. An edit of another dtype or device is refused, not cast: a silent cast would hide that
    an fp32 edit (an SAE reconstruction) is rounded to the model's bf16, or that a bf16 edit dropped bits of an fp32
    activation (hook_scale); TransformerLens casts nothing either."""
    if edited is None or edited is given:
        return
    if not isinstance(edited, torch.Tensor) or edited.shape != given.shape:
        got = tuple(edited.shape) if isinstance(edited, torch.Tensor) else type(edited).__name__
        raise ValueError(f"a hook on {name} returned {got}; a hook must return None or a tensor of the "
                         f"shape it was given, {tuple(given.shape)}")
    if edited.device != given.device:
        raise ValueError(f"a hook on {name} returned a tensor on {edited.device}, but it was given one on "
                         f"{given.device}: move the edit back, `return edited.to(tensor.device)`")
    if edited.dtype != given.dtype:
        raise ValueError(f"a hook on {name} returned a {edited.dtype} tensor, but it was given {given.dtype} (what "
                         f"the model computes in there): cast the edit back, `return edited.to(tensor.dtype)`")


class HookPoint(_HookPoint):
    """TransformerLens's HookPoint with the edit check, and `splices`: callables applied in order to what the hooks
    left (an SAE spliced here, lens_det.sae); empty, the hook point returns what its hooks returned."""

    def __init__(self):
        super().__init__()
        self.splices: list = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = super().__call__(x)
        check_edit(self.name, x, out)
        for splice in self.splices:
            out = splice(out)
        return out
