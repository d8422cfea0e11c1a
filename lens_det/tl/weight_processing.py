"""TransformerLens's weight processing, opt-in: fold_ln, center_writing_weights, center_unembed, fold_value_biases
and refactor_factored_attn_matrices, each with TransformerLens 2.x's meaning.

Each step rewrites weights in place so that the model computes the same function up to float rounding: the same
logits, or for center_unembed the same log-probs. A step that would change the function on a family is refused
before anything is touched, with the reason (`why_not`). A processed model is no longer HF-exact: `processing`
on the model names the steps applied, and the parity report compares only the hooks whose meaning is unchanged
(`changed_hooks`), at a tolerance.

Norm gains are folded by setting the norm's weight to its identity gain (ones, or zeros for Gemma's 1 + w) and its
bias to zeros, so a folded norm only normalises (TransformerLens's LNPre / RMSPre); the module and its hooks stay.
Tied embeddings are untied by the first step that changes W_U or W_E.
"""

from __future__ import annotations

import torch
from torch import nn
from lens_det.hooks import invalidated_kinds

STEPS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
         "refactor_factored_attn_matrices")  # TransformerLens's order


def why_not(config, step: str) -> str | None:
    """Why `step` would change what a model of `config` (a LensConfig) computes, or None where it is valid."""
    c = config
    if c.n_streams > 1:
        return (f"{step} is not implemented on a multi-stream (AltUp) model: its residual is {c.n_streams} streams "
                "mixed by a router, and ln1's output also feeds LAuReL")
    if step == "fold_ln" and c.residual_from_norm:
        return ("the norm's output is also the residual stream (residual_from_norm), so its gain and bias cannot move "
                "into the next layer's weights")
    if step == "center_writing_weights":
        if c.norm != "layernorm":
            return ("RMSNorm does not subtract the mean, so centring what is written to the residual stream changes "
                    "every norm's output (TransformerLens skips this step for RMSNorm models)")
        if c.post_attn_norm or c.post_mlp_norm:
            return ("the attention / MLP outputs pass through a norm before the residual add, so W_O / W_out do not "
                    "write the residual stream")
    if step == "fold_value_biases" and c.kv_source_layer and c.attn_bias:
        return ("KV-sharing layers attend to an earlier layer's values, so its b_V would have to fold into their b_O "
                "as well (not implemented)")
    if step == "fold_value_biases" and c.v_norm and c.attn_bias:
        return "v_norm normalises the values after the bias is added, so b_V does not add a constant to the output"
    if step == "center_unembed" and c.final_softcap:
        return (f"the final logit soft-cap tanh(l / {c.final_softcap:g}) * {c.final_softcap:g} does not commute with a "
                "shift of the logits, so centring W_U would change the log-probs")
    if step == "refactor_factored_attn_matrices":
        if c.positional == "rope":
            return ("with RoPE the QK circuit depends on the query and key positions, so W_Q W_K^T has no "
                    "position-free SVD")
        if c.qk_norm:
            return "q_norm / k_norm act on q and k themselves, which a refactor changes"
        if any(c.layer_n_rep(i) > 1 for i in range(c.n_layers)):
            return ("grouped-query attention shares each key/value head among query heads; a per-head refactor "
                    "would split them")
    return None


def process_weights_(model, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                     fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False):
    """Apply the chosen steps in place (defaults: TransformerLens's process_weights_). Every chosen step must be
    valid for the model (see `why_not`); otherwise nothing is changed and ValueError says which to switch off."""
    chosen = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
                  fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices)
    steps = [s for s in STEPS if chosen[s]]
    refused = {s: why for s in steps if (why := why_not(model.config, s)) is not None}
    if refused:
        reasons = "; ".join(f"{s}: {why}" for s, why in refused.items())
        fix = ", ".join(f"{s}=False" for s in refused)
        raise ValueError(f"not valid for {model.cfg.architecture}: {reasons}. Pass {fix}")
    with torch.no_grad():
        for step in steps:
            STEP_FUNCTIONS[step](model)
    model.processing = tuple(dict.fromkeys((*model.processing, *steps)))
    return model


# --- helpers: everything is computed in float64 on the parameter's device, then written back in its dtype ---
def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def _write(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(device=param.device, dtype=param.dtype))


def _norm_affine(norm) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gain, bias) of a norm in float64, and reset it to the identity affine map."""
    gain = _f64(norm.w) + 1.0 if getattr(norm, "unit_offset", False) else _f64(norm.w)
    bias = _f64(norm.b) if hasattr(norm, "b") else None
    norm.w.fill_(0.0 if getattr(norm, "unit_offset", False) else 1.0)
    if bias is not None:
        norm.b.zero_()
    return gain, bias


def _readers(block_part) -> list[tuple[nn.Parameter, nn.Parameter | None]]:
    """The (weight [out, in], bias) pairs of the linear maps that read a norm's output."""
    names = (("w_qkv", "b_qkv"),) if hasattr(block_part, "w_qkv") else (
        ("w_q", "b_q"), ("w_k", "b_k"), ("w_v", "b_v"), ("w_in", "b_in"), ("w_gate", "b_gate"))
    return [(getattr(block_part, w), getattr(block_part, b)) for w, b in names
            if getattr(block_part, w, None) is not None]  # K = V layers have no w_v


def _fold_into(gain, shift, readers, center: bool) -> None:
    """x -> (x_hat * gain + shift) @ W^T + b  ==  x_hat @ (W * gain)^T + (b + W @ shift); with `center` (the norm
    subtracts the mean, so x_hat has mean 0) the reading weights are centred over d_model, as TransformerLens."""
    for w, b in readers:
        w64 = _f64(w)
        g = gain.to(w64.device)
        if shift is not None and bool((shift != 0).any()):
            if b is None:
                raise NotImplementedError("folding a norm bias into a projection without a bias is not implemented")
            _write(b, _f64(b) + w64 @ shift.to(w64.device))
        folded = w64 * g
        _write(w, folded - folded.mean(1, keepdim=True) if center else folded)


def _untie(model) -> None:
    """Give the unembedding its own weight (TransformerLens keeps W_U separate from W_E)."""
    unembed = model.unembed
    if unembed.weight is None:
        unembed.weight = nn.Parameter(unembed.w.detach().clone(), requires_grad=unembed.w.requires_grad)
        unembed._embed = None


def _unembed_bias(model) -> nn.Parameter:
    unembed = model.unembed
    if unembed.bias is None:
        w = unembed.w
        unembed.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    return unembed.bias


# --- the steps ---
def _fold_ln(model) -> None:
    center = model.config.norm == "layernorm"
    for block in model.blocks:
        gain, shift = _norm_affine(block.ln1)
        _fold_into(gain, shift, _readers(block.attn), center)
        gain, shift = _norm_affine(block.ln2)
        _fold_into(gain, shift, _readers(block.mlp), center)
    _untie(model)
    gain, shift = _norm_affine(model.ln_final)
    w = model.unembed.weight
    if shift is not None:
        bias = _unembed_bias(model)
        _write(bias, _f64(bias) + _f64(w) @ shift.to(w.device))
    folded = _f64(w) * gain.to(w.device)
    _write(w, folded - folded.mean(1, keepdim=True) if center else folded)


def _center(param) -> None:
    """Subtract the mean over d_model (dim 0 of an [d_model, ...] HF weight, or of a [d_model] bias)."""
    if param is not None:
        value = _f64(param)
        _write(param, value - value.mean(0, keepdim=True))


def _center_writing_weights(model) -> None:
    _untie(model)
    embed = _f64(model.embed.W_E)
    _write(model.embed.W_E, embed - embed.mean(1, keepdim=True))
    for block in model.blocks:
        for param in (block.attn.w_o, block.attn.b_o, block.mlp.w_out, block.mlp.b_out):
            _center(param)


def _center_unembed(model) -> None:
    _untie(model)
    _center(model.unembed.weight)  # [d_vocab, d_model]: the mean over the vocabulary
    _center(model.unembed.bias)


def _fold_value_biases(model) -> None:
    """b_O += sum over heads of b_V[h] @ W_O[h]; b_V = 0 (attention rows sum to 1, so b_V adds a constant)."""
    for block in model.blocks:
        attn = block.attn
        weights = attn.qkv_weights()[2]
        if weights is None or weights[1] is None:
            continue  # no value bias: nothing to fold
        per_head = attn.repeat_kv_heads(_f64(weights[1]))  # [head, d_head]
        w_o = _f64(attn.W_O)  # [head, d_head, d_model]
        _write(attn.b_o, _f64(attn.b_o) + torch.einsum("hd,hdm->m", per_head, w_o))
        weights[1].zero_()


def _refactor_factored_attn_matrices(model) -> None:
    """TransformerLens's refactor: W_QK = W_Q W_K^T (biases as an extra input row) split evenly by its SVD;
    W_OV = W_V W_O as (U S, V^T), after folding b_V into b_O."""
    from transformer_lens import FactoredMatrix

    _fold_value_biases(model)
    for block in model.blocks:
        attn = block.attn
        (w_q, b_q), (w_k, b_k), (w_v, _) = attn.qkv_weights()  # [head, d_head, d_model], [head, d_head]

        def eff(w, b):  # [head, d_model + 1, d_head]: the input gets a constant 1 coordinate
            bias = torch.zeros_like(_f64(w)[:, :, 0]) if b is None else _f64(b)
            return torch.cat([_f64(w).transpose(1, 2), bias[:, None, :]], dim=1)

        q_eff, k_eff_t = FactoredMatrix(eff(w_q, b_q), eff(w_k, b_k).transpose(-1, -2)).make_even().pair
        k_eff = k_eff_t.transpose(-1, -2)
        for (w, b), new in (((w_q, b_q), q_eff), ((w_k, b_k), k_eff)):
            _write(w, new[:, :-1, :].transpose(1, 2))
            if b is not None:
                _write(b, new[:, -1, :])
            elif bool((new[:, -1, :] != 0).any()):
                raise NotImplementedError("refactoring the QK circuit of a model without q/k biases is not implemented")
        u, s, vh = FactoredMatrix(_f64(attn.W_V), _f64(attn.W_O)).svd()  # W_OV = U diag(S) Vh^T
        _write(w_v, (u * s[..., None, :]).transpose(1, 2))
        w_o = attn.w_o.view(attn.cfg.d_model, attn.cfg.n_heads, attn.d_head)  # [d_model, head, d_head]
        _write(w_o, vh.permute(1, 0, 2))


STEP_FUNCTIONS = {"fold_ln": _fold_ln, "center_writing_weights": _center_writing_weights,
                  "center_unembed": _center_unembed, "fold_value_biases": _fold_value_biases,
                  "refactor_factored_attn_matrices": _refactor_factored_attn_matrices}

# Hooks whose value means something else after a step (so they have no HF reference any more), by hook kind.
def changed_hooks(processing) -> dict[str, str]:
    """{hook kind (name without "blocks.{i}."): the first step of `processing` that changed its meaning}, read from
    the hook-kind registry (each entry's `invalidated_by`)."""
    return invalidated_kinds(processing)


CHANGED_HOOKS = {step: set(changed_hooks([step])) for step in STEPS}  # step -> the hook kinds it changes
