"""Known bugs, injectable into a lens_det model, to show that a parity or invariance check catches them (and
where). Each is a context manager that restores the model on exit.

    with faults.alibi_row0_on_cached_steps():   # TransformerLens 2.8's Bloom KV-cache bug
        report = compare(model, hf_model, tokens, mask, prefill=8)
    report.first_divergence                     # cached:1, layer 0, attn.hook_attn_scores
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from lens_det.components.context import ForwardContext


@contextlib.contextmanager
def _patched(owner, name: str, value):
    """owner.name = value inside the block; on exit the old value is back (a method of owner's class is un-shadowed
    again, not replaced by a bound copy)."""
    method = callable(getattr(type(owner), name, None)) and name not in vars(owner)
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if method:
            delattr(owner, name)
        else:
            setattr(owner, name, before)


def alibi_row0_on_cached_steps():
    """TransformerLens 2.8's Bloom bug: cached steps used row 0 of the ALiBi matrix (the bias of query 0, zero
    for every later key), so decoding from the cache lost all position information."""
    correct = ForwardContext.alibi

    def alibi(self, slopes, key_start, device):
        bias = correct(self, slopes, key_start, device)
        return bias * 0 if self.query_start > 0 else bias
    return _patched(ForwardContext, "alibi", alibi)


def rope_offset_after_cache(offset: int = 1):
    """RoPE positions of cached steps shifted by `offset` (a cache that miscounts the tokens it holds)."""
    correct = ForwardContext.rope

    def rope(self, inv_freq, key, device):
        if self.query_start == 0:
            return correct(self, inv_freq, key, device)
        shifted = ForwardContext(self.mask, 0, self.n_query, self.dtype, self.position_ids + offset)
        return correct(shifted, inv_freq, key, device)
    return _patched(ForwardContext, "rope", rope)


def mask_ignores_padding():
    """Attention masks built as if every token were real (pads attended to)."""
    correct = ForwardContext.additive_mask

    def additive_mask(self, key_start, n_key, window, device):
        everything = ForwardContext(torch.ones_like(self.mask), self.query_start, self.n_query, self.dtype)
        return correct(everything, key_start, n_key, window, device)
    return _patched(ForwardContext, "additive_mask", additive_mask)


def sliding_window_off_by_one(model, layer: int):
    """One sliding-window layer sees one key too many."""
    attn = model.blocks[layer].attn
    if attn.window is None:
        raise ValueError(f"layer {layer} is not a sliding-window layer")
    return _patched(attn, "window", attn.window + 1)


def wrong_attention_scale(model, layer: int, scale: float | None = None):
    """One layer scales scores by head_dim ** -0.5 (or `scale`) instead of the configured factor, the classic
    Gemma 2/3 query_pre_attn_scalar mistake."""
    attn = model.blocks[layer].attn
    scale = attn.d_head**-0.5 if scale is None else scale
    return _patched(attn, "cfg", dataclasses.replace(attn.cfg, attn_scale=scale))


@contextlib.contextmanager
def _patched_all(pairs):
    """_patched for several (owner, name, value) at once."""
    with contextlib.ExitStack() as stack:
        for owner, name, value in pairs:
            stack.enter_context(_patched(owner, name, value))
        yield


def _rms_norms(model):
    from lens_det.components.norms import RMSNorm

    return [m for m in model.modules() if isinstance(m, RMSNorm)]


def rmsnorm_unit_offset(model):
    """Every weighted RMSNorm multiplies by (1 + w), Gemma 1-3's gain, on a model whose norms use w (Gemma 4)."""
    return _patched_all([(norm, "unit_offset", True) for norm in _rms_norms(model) if norm.w is not None])


def rmsnorm_rsqrt(model):
    """Every RMSNorm forms 1 / sqrt(ms + eps) with torch.rsqrt instead of Gemma 4's torch.pow(., -0.5). Whether
    this changes any bit depends on the build and device: on x86 CPU torch 2.13 both give the same fp32 bits."""
    return _patched_all([(norm, "inv_sqrt", "rsqrt") for norm in _rms_norms(model)])


def rmsnorm_reciprocal_sqrt(model):
    """Every RMSNorm divides by sqrt(ms + eps) (x / sqrt(.)) instead of multiplying by pow(., -0.5): the
    normalisation step of ops.rms_norm replaced (the gain step is the real one)."""
    from lens_det import ops

    return _patched(ops, "times_inv_sqrt", lambda xf, denominator, inv_sqrt: xf / denominator.sqrt())


def full_rope_instead_of_partial(model):
    """Layers with partial ("proportional") RoPE rotate every frequency pair, as ordinary RoPE (rotary
    fraction 1 in their rope_args, which sets their inv_freq)."""
    pairs = []
    for block in model.blocks:
        args = getattr(block.attn, "rope_args", None)  # (d_head, theta, linear_factor, rotary_fraction); None: ALiBi
        if args is not None and args[3] != 1.0:
            pairs.append((block.attn, "rope_args", (*args[:3], 1.0)))
    if not pairs:
        raise ValueError("no layer of this model has partial RoPE")
    return _patched_all(pairs)


def missing_v_norm(model):
    """Values skip the weightless v_norm (Gemma 4)."""
    from torch import nn

    pairs = [(block.attn, "v_norm", nn.Identity()) for block in model.blocks if not isinstance(block.attn.v_norm,
                                                                                                   nn.Identity)]
    if not pairs:
        raise ValueError("this model has no v_norm")
    return _patched_all(pairs)


def kv_sharing_new_keys_only(model):
    """KV-sharing consumers attend to their source layer's keys/values of the current call's tokens only, not
    past + new (sharing built beside the cache instead of after its update; HF 5.5's use_cache=False bug was the
    mirror image). Uncached forwards are unaffected; every cached step after the first is wrong."""
    from lens_det.components.attention import Attention

    pairs = []
    for block in model.blocks:
        attn = block.attn
        if attn.shares_kv:
            def publish(ctx, k, v, key_start, attn=attn):
                n = ctx.n_query
                Attention._publish_kv(attn, ctx, k[:, :, -n:], v[:, :, -n:], key_start + k.shape[-2] - n)
            pairs.append((attn, "_publish_kv", publish))
    if not pairs:
        raise ValueError("this model has no KV sharing")
    return _patched_all(pairs)


def kv_consumers_run_every_position(model):
    """With logits_to_keep, the KV-sharing layers still run on every position (HF's eager forward runs them on the
    kept positions only, `_maybe_slice_kv_shared_inputs`): the same function, other matmul shapes, so the kept
    logits round differently from HF's (and HF generate's)."""
    if model.kv_consumer_tail is None:
        raise ValueError("this model has no tail of KV-sharing layers")
    return _patched(model, "kv_consumer_tail", None)


def per_layer_inputs_unscaled(model):
    """Per-layer embeddings combined as proj + table, without HF's * 2**-0.5. Nearly invisible in the logits: each
    block's PLE sub-block ends in an RMSNorm, scale-invariant up to its eps."""
    if getattr(model, "ple", None) is None:
        raise ValueError("this model has no per-layer embeddings")
    return _patched(model.ple, "combine_scale", 1.0)


def _moe_blocks(model):
    blocks = [block for block in model.blocks if hasattr(block, "moe")]
    if not blocks:
        raise ValueError("this model has no mixture of experts")
    return blocks


def _every_router(model, name: str, value):
    """Every MoE router (MixtureOfExperts.route) with its step or attribute `name` replaced (the hooks still
    fire)."""
    return _patched_all([(block.moe, name, value) for block in _moe_blocks(model)])


def router_softmax_in_model_dtype(model):
    """The router's softmax runs in the logits' dtype (bf16) and is upcast afterwards; HF asks for fp32
    (`softmax(..., dtype=torch.float32)`). Invisible in an fp32 model."""
    return _every_router(model, "_probs", lambda logits: torch.softmax(logits, dim=-1).float())


def router_without_renormalisation(model):
    """The top-k probabilities are used as they are, not renormalised to sum to 1 over the chosen experts."""
    return _every_router(model, "_renormalise", lambda top_w: top_w)


def router_without_per_expert_scale(model):
    """The learned per-expert scale of the routing weights is dropped."""
    return _every_router(model, "_scale", lambda top_w, top_i: top_w)


def router_without_root_size(model):
    """The router input is not multiplied by d_model ** -0.5 (it changes the logits, so the routing): the factor
    set to 1.0 (x * 1.0 is x exactly)."""
    return _every_router(model, "root_size", 1.0)


def router_reads_normed_input(model):
    """The router reads the pre-MLP norm's output (as the dense MLP does) instead of the un-normed residual."""
    return _patched_all([(block, "_router_input", lambda m, mlp_in: m) for block in _moe_blocks(model)])


def _altup_blocks(model):
    if model.config.n_streams == 1:
        raise ValueError("this model has one residual stream (no AltUp)")
    return list(model.blocks)


def stream_magnitude_not_matched(model):
    """AltUp's streams 1.. are the embedding's projections (and, at the end, the unembed projections) as they are,
    not rescaled to stream 0's root-mean-square."""
    from lens_det.components import streams

    _altup_blocks(model)
    return _patched(streams, "match_magnitude", lambda x, target: x)


def gate_std_unbiased(model):
    """The gaussian top-k cutoff uses the sample std (Bessel's correction, torch.std's default) instead of HF's
    population std."""
    mlps = [block.mlp for block in model.blocks if getattr(block.mlp, "sparsity", 0.0)]
    if not mlps:
        raise ValueError("this model has no gate sparsity")
    return _patched_all([(mlp, "_std", lambda g: torch.std(g, dim=-1, keepdim=True)) for mlp in mlps])


def per_layer_input_on_every_stream(model):
    """The per-layer sub-block's output is added to every AltUp stream, stream 0 included (HF: streams 1.. only)."""
    return _patched_all([(block, "_add_to_streams", lambda corrected, added: corrected + added)
                         for block in _altup_blocks(model)])
