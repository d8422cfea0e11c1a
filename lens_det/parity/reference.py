"""HF reference values for lens_det hook points.

`capture_reference` runs an HF model (BloomForCausalLM, Gemma/Gemma2/VaultGemma/Gemma3/Gemma4 CausalLM or the text
part of Gemma3/Gemma4ForConditionalGeneration) once and returns, for every lens_det hook point, the value HF
computed there: read from an HF module's input or output (the module found by the lens_det weight it holds, from
the family's lens<->HF table in lens_det.hf: `module_names`), recorded inside HF's attention call (a recorder put
in place of the attention function HF looks up for its implementation, calling HF's own `eager_attention_forward`
or `sdpa_attention_forward`), or derived from HF tensors with HF's own operations where HF has no single tensor
(the norm divisor, Bloom's pre-softmax scores, per-head results), or recorded from the GEMM calls inside HF's MoE
experts (a torch function mode while the experts module runs). `SOURCES` says which, per hook kind.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch

from lens_det import ops
from lens_det.config import LensConfig
from lens_det.hf import FAMILIES, decoder_of, hf_attn_implementation, module_names
from lens_det.hooks import HOOK_KINDS
from lens_det.parity.reference_blocks import (_altup_block, _derived_altup_values, _per_layer_block,
                                             _per_layer_embeddings, _streams_model)

# How each hook kind's reference is obtained ("module": an HF module's input/output; "attention": recorded in
# HF's eager attention call; "derived": computed from HF tensors with HF's operations; "call": the input or output of
# a GEMM call (F.linear, torch._grouped_mm) recorded inside an HF module, for MoE experts, which have no submodules),
# keyed as lens_det.hooks.HOOK_KINDS is (where it is written, beside each kind's layout and op).
SOURCES = {key: kind.source for key, kind in HOOK_KINDS.items()}


def _first(args, kwargs, name):
    return args[0] if args else kwargs[name]


class _Recorder:
    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self.skip: set[str] = set()  # recorded names that are no lens_det hook point of this model
        self.restore: list[Callable] = []
        self.active_modes: list = []

    def tap(self, module, name: str, where: str, fn: Callable = lambda t: t):
        """Record fn(module input or output) under `name`."""
        if where == "out":
            def hook(mod, args, kwargs, out):
                self.values[name] = fn(out[0] if isinstance(out, tuple) else out).detach()
            self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        else:
            def pre(mod, args, kwargs):
                self.values[name] = fn(_first(args, kwargs, "hidden_states")).detach()
            self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def norm(self, module, prefix: str, cfg: LensConfig, shape: Callable = lambda t: t):
        """A norm's two hooks; `shape` views HF's tensor in lens_det's layout first (e.g. [b * t, d] -> [b, t, d])."""
        center = cfg.norm == "layernorm"
        self.tap(module, prefix + "hook_normalized", "out", shape)
        self.tap(module, prefix + "hook_scale", "in", lambda x: ops.norm_scale(shape(x), cfg.norm_eps, center))

    def experts(self, module: Callable, prefix: str, cfg: LensConfig, per_token: Callable):
        """Gemma 4's MoE block of one HF decoder layer (enable_moe_block); `module(lens_weight)` is the HF module."""
        self.norm(module("ln2_dense_post.w"), prefix + "ln2_dense_post.", cfg)
        self.tap(module("ln2_dense_post.w"), prefix + "hook_dense_mlp_out", "out")
        self.norm(module("ln2_moe.w"), prefix + "ln2_moe.", cfg, per_token)
        router = module("moe.w_router_scale")  # HF's router: its norm, its projection, then softmax / top-k
        self.norm(router.norm, prefix + "moe.router_norm.", cfg, per_token)
        self.tap(module("moe.w_router"), prefix + "moe.hook_router_logits", "out", per_token)

        def routed(mod, args, kwargs, out):
            probs, weights, indices = out
            self.values |= {prefix + "moe.hook_expert_weights": per_token(probs).detach(),
                            prefix + "moe.hook_top_k_weights": per_token(weights).detach(),
                            prefix + "moe.hook_expert_indices": per_token(indices).detach()}
        self.handles.append(router.register_forward_hook(routed, with_kwargs=True))
        experts = module("moe.w_gate_up")
        self.tap(experts, prefix + "moe.hook_out", "out", per_token)
        self.expert_calls(experts, prefix)
        self.norm(module("ln2_moe_post.w"), prefix + "ln2_moe_post.", cfg)
        self.tap(module("ln2_moe_post.w"), prefix + "hook_moe_out", "out")

    def expert_calls(self, experts, prefix: str):
        """Record the GEMMs HF's experts module runs (F.linear or torch._grouped_mm: input, weight, output) while it
        runs, under prefix + "moe.calls" (turned into hook_pre / hook_pre_linear / hook_post by _expert_activations)."""
        mode = _GemmCalls()

        def pre(mod, args, kwargs):
            mode.calls = []
            mode.__enter__()
            self.active_modes.append(mode)

        def post(mod, args, kwargs, out):
            self.active_modes.remove(mode)
            mode.__exit__(None, None, None)
            self.values[prefix + "moe.calls"] = mode.calls
        self.handles.append(experts.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(experts.register_forward_hook(post, with_kwargs=True))

    def remove(self):
        for handle in self.handles:
            handle.remove()
        for undo in self.restore:
            undo()
        while self.active_modes:  # an HF forward that raised inside the experts left its recorder on
            self.active_modes.pop().__exit__(None, None, None)


class _GemmCalls(torch.overrides.TorchFunctionMode):
    """Records (input, output) of every F.linear / torch._grouped_mm call made while active."""

    GEMMS = (torch.nn.functional.linear, torch._grouped_mm)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.GEMMS:
            self.calls.append((func, args[0].detach(), out.detach()))
        return out


def _expert_activations(values: dict, prefix: str, n_experts: int, shape: tuple) -> None:
    """hook_pre / hook_pre_linear / hook_post of one MoE layer from HF's recorded expert GEMMs, each row placed at
    its (token, slot) with the indexing HF's implementation used (eager: torch.where on the [expert, slot, token]
    one-hot per expert hit, ascending; grouped_mm: torch.sort of the flat expert ids)."""
    calls = values.pop(prefix + "moe.calls")
    top_i = values[prefix + "moe.hook_expert_indices"].reshape(-1, shape[-1])
    n_tokens, k = top_i.shape
    if calls[0][0] is torch._grouped_mm:
        perm = torch.sort(top_i.reshape(-1))[1]
        rows = [(perm // k, perm % k, calls[0][2], calls[1][1])]
    else:
        mask = torch.nn.functional.one_hot(top_i, num_classes=n_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        hit = [e for e in hit if e != n_experts]
        rows = []
        for j, e in enumerate(hit):
            slot, token = torch.where(mask[e])
            rows.append((token, slot, calls[2 * j][2], calls[2 * j + 1][1]))
    for name, pick in (("pre", lambda gu, h: gu.chunk(2, -1)[0]), ("pre_linear", lambda gu, h: gu.chunk(2, -1)[1]),
                       ("post", lambda gu, h: h)):
        width = pick(rows[0][2], rows[0][3]).shape[-1]
        full = rows[0][2].new_zeros(n_tokens, k, width)
        for token, slot, gate_up, post in rows:
            full[token, slot] = pick(gate_up, post)
        values[f"{prefix}moe.hook_{name}"] = full.view(*shape[:-1], k, width)


@contextlib.contextmanager
def _recording_attention(hf_model: Any, recorder: _Recorder):
    """Temporarily route the Gemma family's attention through a recorder that calls the function HF runs under its
    implementation's own name (eager: the family's `eager_attention_forward`; sdpa: transformers'
    `sdpa_attention_forward`) with HF's own arguments, and records its inputs (and, eager, its scores and weights).

    The recorder replaces that name's entry in transformers' attention registry (ALL_ATTENTION_FUNCTIONS's local
    mapping) for the call and is restored afterwards; the configs keep their `_attn_implementation`, so HF builds the
    masks it always builds for it (eager_mask / sdpa_mask, with its own allow_is_causal_skip) and takes every branch
    that HF takes by that name (e.g. Gemma 4's `_maybe_slice_kv_shared_inputs`, which checks for "sdpa"). Modules of
    other models that run meanwhile are passed through unrecorded."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # the decoder's attention and masks read the text config (a vision tower's implementation does not matter)
    text_config = getattr(hf_model.config, "text_config", None) or hf_model.config
    name = getattr(text_config, "_attn_implementation", None)  # the key HF looks up (None: HF falls back to eager)
    implementation = hf_attn_implementation(hf_model)  # "eager" or "sdpa"; any other raises with what to do
    ours = {id(m) for m in hf_model.modules()}
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, before = name in local, local.get(name)

    def passthrough(module, *args, **kwargs):  # what HF would have called for a module of another model
        if had:
            return before(module, *args, **kwargs)
        if implementation == "sdpa":
            return ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"](module, *args, **kwargs)
        return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)

    def record_eager(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        if id(module) not in ours:
            return passthrough(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kwargs)
        family = sys.modules[type(module).__module__]
        out, weights = family.eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                                      softcap=softcap, **kwargs)
        prefix, n_new = f"blocks.{module.layer_idx}.attn.", query.shape[-2]
        k_rep = family.repeat_kv(key, module.num_key_value_groups)  # a stride-0 view for MQA, as in HF
        scores = torch.matmul(query, k_rep.transpose(2, 3)) * scaling  # eager_attention_forward's ops
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask
        recorder.values |= {
            prefix + "hook_rot_q": query.transpose(1, 2).detach(),
            prefix + "hook_rot_k": key[:, :, -n_new:].transpose(1, 2).detach(),
            prefix + "hook_attn_scores": scores.detach(),
            prefix + "hook_pattern": weights.detach(),
        }
        return out, weights

    def record_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
        if id(module) not in ours:
            return passthrough(module, query, key, value, attention_mask, *args, **kwargs)
        prefix, n_new = f"blocks.{module.layer_idx}.attn.", query.shape[-2]
        recorder.values |= {  # before the call: sdpa_attention_forward may reshape the query (GQA decode packing)
            prefix + "hook_rot_q": query.transpose(1, 2).detach(),
            prefix + "hook_rot_k": key[:, :, -n_new:].transpose(1, 2).detach(),
        }
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    local[name] = record_sdpa if implementation == "sdpa" else record_eager
    try:
        yield implementation
    finally:
        if had:
            local[name] = before
        else:
            local.pop(name, None)


def capture_reference(
    hf_model: Any,
    cfg: LensConfig,
    tokens: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Any = None,
    with_result: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `hf_model` once and return (logits, {lens_det hook name: HF value}) for the new positions.

    `attention_mask` must cover cached + new tokens; `past_key_values` (an HF DynamicCache) is updated.
    """
    decoder = decoder_of(hf_model, cfg)
    top, names = module_names(cfg)  # lens_det weight -> HF module, under the decoder / under one layer
    layers = list(getattr(decoder, FAMILIES[cfg.architecture].LAYERS))
    bloom = cfg.fused_qkv
    h = cfg.n_heads
    rec = _Recorder()
    b, t = tokens.shape

    def per_head(d):  # [b, t, heads * d] -> [b, t, heads, d], d the layer's head dim
        return lambda x: x.view(b, t, -1, d)
    bloom_inputs: dict[int, tuple] = {}
    embed_ln = decoder.get_submodule(top["embed.ln.w"]) if cfg.embed_norm else None
    if embed_ln is not None:
        rec.norm(embed_ln, "embed.ln.", cfg)
    rec.tap(embed_ln if embed_ln is not None else decoder.get_submodule(top["embed.W_E"]), "hook_embed", "out")
    if cfg.d_per_layer_input:
        _per_layer_embeddings(decoder, top, rec, cfg, b, t)
    norms = ("ln1", "ln2") + (("ln1_post", "ln2_post") if cfg.post_attn_norm else ())
    for i, layer in enumerate(layers):
        p, d = f"blocks.{i}.", cfg.layer_d_head(i)

        def module(lens_weight: str, layer=layer):
            return layer.get_submodule(names[lens_weight])
        if cfg.n_streams > 1:  # the decoder layer reads and returns the stream stack; stream 0 is the residual
            _altup_block(layer, rec, cfg, p, b, t)
        else:
            rec.tap(layer, p + "hook_resid_pre", "in")
            n_kv = cfg.layer_n_key_value_heads(i)
            for name, n in (("attn_in", cfg.n_heads), ("q_input", cfg.n_heads), ("k_input", n_kv),
                            ("v_input", n_kv)):  # TL's per-head copies of the decoder layer's input
                rec.tap(layer, f"{p}hook_{name}", "in", lambda x, n=n: x[:, :, None, :].expand(-1, -1, n, -1))
            rec.tap(layer, p + "hook_resid_post", "out")
        for norm in norms:
            rec.norm(module(f"{norm}.w"), f"{p}{norm}.", cfg)
        rec.tap(module("ln2.w"), p + "hook_resid_mid", "in")
        rec.tap(module("ln2.w"), p + "hook_mlp_in", "in")
        o_proj, down = module("attn.w_o"), module("mlp.w_out")
        rec.tap(o_proj, p + "attn.hook_z", "in", per_head(d))
        rec.tap(down, p + "mlp.hook_post", "in")
        # the sandwich norms' outputs are what the residual adds (Gemma 2/3/4), else the projections'
        rec.tap(module("ln1_post.w") if cfg.post_attn_norm else o_proj, p + "hook_attn_out", "out")
        rec.tap(module("ln2_post.w") if cfg.post_attn_norm else down, p + "hook_mlp_out", "out")
        if bloom:
            bloom_inputs[i] = None
            layer_inputs = lambda mod, args, kwargs, i=i: bloom_inputs.__setitem__(  # noqa: E731
                i, (kwargs["alibi"], kwargs["attention_mask"])
            )
            rec.handles.append(layer.register_forward_pre_hook(layer_inputs, with_kwargs=True))
            for j, name in enumerate("qkv"):
                rec.tap(module("attn.w_qkv"), f"{p}attn.hook_{name}", "out",
                        lambda x, j=j, d=d: x.view(b, t, h, 3, d)[..., j, :])
            rec.tap(module("mlp.w_in"), p + "mlp.hook_pre", "out")
            continue
        own_kv = cfg.layer_kv_source(i) is None  # KV-sharing consumers have no k/v projections or norms
        for name in "qk" if own_kv else "q":
            rec.tap(module(f"attn.w_{name}"), f"{p}attn.hook_{name}", "out", per_head(d))
        # K = V layers (Gemma 4 attention_k_eq_v) have no v_proj: their values are k_proj's output
        if own_kv:
            rec.tap(module("attn.w_k" if cfg.layer_k_eq_v(i) else "attn.w_v"), f"{p}attn.hook_v", "out", per_head(d))
        # Gemma 3 norms q/k as [batch, head, pos, d]; Gemma 4 norms q/k/v as [batch, pos, head, d] (before the
        # transpose), lens_det's layout
        to_tl = (lambda x: x) if cfg.v_norm else (lambda x: x.transpose(1, 2))
        qk = ("q", "k") if cfg.qk_norm else ()
        for name in (qk + (("v",) if cfg.v_norm else ()) if own_kv else ("q",) if cfg.qk_norm else ()):
            norm = module(f"attn.{name}_norm.w")
            rec.tap(norm, f"{p}attn.{name}_norm.hook_normalized", "out", to_tl)
            rec.tap(norm, f"{p}attn.{name}_norm.hook_scale", "in",
                    lambda x: ops.norm_scale(to_tl(x), cfg.norm_eps, center=False))
        rec.tap(module("mlp.w_gate"), p + "mlp.hook_pre", "out")
        rec.tap(module("mlp.w_in"), p + "mlp.hook_pre_linear", "out")
        if cfg.d_per_layer_input:
            _per_layer_block(layer, module, rec, cfg, p)
        if cfg.n_experts and getattr(layer, "enable_moe_block", False):
            rec.experts(module, p, cfg, lambda x: x.view(b, t, *x.shape[1:]))
    rec.norm(decoder.get_submodule(top["ln_final.w"]), "ln_final.", cfg)
    if cfg.n_streams > 1:
        _streams_model(decoder, layers, rec, cfg)
    if cfg.kv_source_layer:  # HF's attention receives the source layer's keys: no hook_rot_k of their own
        rec.skip |= {f"blocks.{i}.attn.hook_rot_k" for i in range(cfg.n_layers) if cfg.layer_kv_source(i) is not None}

    kwargs: dict[str, Any] = {"attention_mask": attention_mask}
    if past_key_values is not None:
        kwargs |= {"past_key_values": past_key_values, "use_cache": True}
    else:
        kwargs["use_cache"] = False
    if position_ids is not None and not bloom:
        kwargs["position_ids"] = position_ids
    attention = contextlib.nullcontext() if bloom else _recording_attention(hf_model, rec)
    try:
        with torch.no_grad(), attention:
            out = hf_model(tokens, output_attentions=bloom, **kwargs)
    finally:
        rec.remove()
    values = {k: v for k, v in rec.values.items() if k not in rec.skip}
    with torch.no_grad():
        if cfg.n_streams > 1:
            _derived_altup_values(values, cfg)
        for i in range(len(layers)):
            if f"blocks.{i}.moe.calls" in values:
                _expert_activations(values, f"blocks.{i}.", cfg.n_experts, (b, t, cfg.n_experts_per_token))
        if bloom:
            _bloom_attention(values, out.attentions, cfg, bloom_inputs, past_key_values)
        if with_result:
            for i, layer in enumerate(layers):
                o = layer.get_submodule(names["attn.w_o"])
                z = values[f"blocks.{i}.attn.hook_z"]
                w_o = o.weight.view(cfg.d_model, h, cfg.layer_d_head(i))
                values[f"blocks.{i}.attn.hook_result"] = torch.einsum("bqhd,mhd->bqhm", z, w_o)
    return out.logits, values


def _bloom_attention(values, attentions, cfg: LensConfig, inputs: dict, cache) -> None:
    """Bloom's pattern (output_attentions) and pre-softmax scores: BloomAttention's own op sequence on the
    query/keys, ALiBi tensor and causal mask that HF passed to each block."""
    for i, pattern in enumerate(attentions):
        p = f"blocks.{i}.attn."
        values[p + "hook_pattern"] = pattern
        q = values[p + "hook_q"].transpose(1, 2)
        k = values[p + "hook_k"].transpose(1, 2) if cache is None else cache.layers[i].keys
        b, h, n_q, d = q.shape
        alibi, mask = inputs[i]
        scores = alibi.baddbmm(
            batch1=q.reshape(b * h, n_q, d), batch2=k.reshape(b * h, -1, d).transpose(-1, -2),
            beta=1.0, alpha=cfg.attn_scale,
        ).view(b, h, n_q, -1)
        values[p + "hook_attn_scores"] = scores + mask
