"""Reference taps of the Gemma family's extra sub-blocks, for lens_det.parity.reference.capture_reference: Gemma 4's
per-layer embeddings (model level and per decoder layer) and Gemma 3n's AltUp streams, router coefficients,
predictions, corrections, LAuReL and sparse gate. Each records HF's own tensors (module inputs / outputs, a method's
return wrapped for the call, or HF's ops on HF's tensors where HF has no single tensor)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from lens_det.config import LensConfig


def _per_layer_embeddings(decoder: Any, top: dict, rec, cfg: LensConfig, b: int, t: int) -> None:
    """Gemma 4 PLE, model level: the scaled token table, the projection before its norm, the norm, and what
    project_per_layer_inputs returns (recorded by wrapping that method on this instance for the call)."""
    shape = (b, t, cfg.n_layers, cfg.d_per_layer_input)
    rec.tap(decoder.get_submodule(top["ple.W_E"]), "ple.hook_tokens", "out", lambda x: x.reshape(shape))
    rec.tap(decoder.get_submodule(top["ple.ln.w"]), "ple.hook_proj", "in")
    rec.norm(decoder.get_submodule(top["ple.ln.w"]), "ple.ln.", cfg)
    original = decoder.project_per_layer_inputs

    def project(*args, **kwargs):
        out = original(*args, **kwargs)
        rec.values["hook_per_layer_inputs"] = out.detach()
        return out

    decoder.project_per_layer_inputs = project
    rec.restore.append(lambda: delattr(decoder, "project_per_layer_inputs"))


def _wrap(rec, owner: Any, method: str, name: str) -> None:
    """Record (a clone of: HF may change it in place afterwards) what `owner.method` returns, for the call."""
    original = getattr(owner, method)

    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        rec.values[name] = out.detach().clone()
        return out

    setattr(owner, method, wrapped)
    rec.restore.append(lambda: delattr(owner, method))


def _altup_block(layer: Any, rec, cfg: LensConfig, p: str, b: int, t: int) -> None:
    """Gemma 3n's decoder layer: the stream stacks in and out (stream 0 is hook_resid_pre / _post), AltUp's router
    coefficients, predictions and corrected streams, LAuReL, and the sparse gate."""
    n = cfg.n_streams
    rec.tap(layer, p + "hook_streams_pre", "in")
    rec.tap(layer, p + "hook_resid_pre", "in", lambda x: x[0])
    rec.tap(layer, p + "hook_streams_post", "out")
    rec.tap(layer, p + "hook_resid_post", "out", lambda x: x[0])
    n_kv = cfg.layer_n_key_value_heads(int(p.split(".")[1]))
    for name, heads in (("attn_in", cfg.n_heads), ("q_input", cfg.n_heads), ("k_input", n_kv), ("v_input", n_kv)):
        # TL's per-head copies of what the attention's norm reads (the active prediction)
        rec.tap(layer.input_layernorm, f"{p}hook_{name}", "in",
                lambda x, heads=heads: x[:, :, None, :].expand(-1, -1, heads, -1))
    rec.tap(layer.altup.prediction_coefs, p + "altup.hook_predict_coefs", "out", lambda x: x.reshape(b, t, n, n))
    rec.tap(layer.altup.correction_coefs, p + "altup.hook_correct_coefs", "out")  # + 1.0 after (_derived_altup_values)
    _wrap(rec, layer.altup, "predict", p + "altup.hook_predictions")
    _wrap(rec, layer.altup, "correct", p + "altup.hook_corrected")  # HF adds the per-layer branch into it after
    rec.tap(layer.laurel, p + "hook_laurel_out", "out")
    rec.tap(layer.laurel.linear_left, p + "laurel.hook_low", "out")
    rec.norm(layer.laurel.post_laurel_norm, p + "laurel.ln.", cfg)
    if layer.mlp.activation_sparsity > 0.0:
        rec.tap(layer.mlp.act_fn, p + "mlp.hook_sparse_gate", "in")


def _streams_model(decoder: Any, layers: list, rec, cfg: LensConfig) -> None:
    """Gemma 3n, model level: the stacked streams layer 0 reads, the unembed projections' outputs (turned into the
    collapsed streams by _derived_altup_values) and the mean the final norm reads."""
    rec.tap(layers[0], "streams_in.hook_streams", "in")
    rec.tap(layers[-1], "streams_out.last", "out")
    for k, proj in enumerate(decoder.altup_unembed_projections):
        rec.tap(proj, f"streams_out.proj.{k}", "out")
    rec.tap(decoder.norm, "streams_out.hook_mean", "in")


def _derived_altup_values(values: dict, cfg: LensConfig) -> None:
    """streams_out.hook_streams from HF's tensors with HF's collapse ops: stream 0, then each unembed projection
    times stream 0's RMS over its own (mean square clamped at 1e-5); AltUp's correction coefficients + 1.0 and its
    innovation (the block's output, resid_mid + mlp_out, minus prediction 0), with HF's ops on HF's tensors."""
    for key in [k for k in values if k.endswith("altup.hook_correct_coefs")]:
        values[key] = values[key] + 1.0  # HF's `correction_coefs(modalities) + 1.0`, in the model dtype
        p = key.removesuffix("altup.hook_correct_coefs")  # HF: activated = attn_laurel + attn_ffw_norm; - pred 0
        activated = values[p + "hook_resid_mid"] + values[p + "hook_mlp_out"]
        values[p + "altup.hook_innovation"] = activated - values[p + "altup.hook_predictions"][0]
    s0 = values.pop("streams_out.last")[0]
    target = torch.mean(s0**2, dim=-1, keepdim=True) ** 0.5
    parts = [s0]
    for k in range(cfg.n_streams - 1):
        c = values.pop(f"streams_out.proj.{k}")
        parts.append(c * target / torch.sqrt(torch.mean(c**2, dim=-1, keepdim=True).clamp(min=1e-5)))
    values["streams_out.hook_streams"] = torch.stack(parts)


def _per_layer_block(layer: Any, module: Callable, rec, cfg: LensConfig, p: str) -> None:
    """Gemma 4 / 3n PLE, per decoder layer: its per_layer_input argument and the gated sub-block at its end."""
    signature = inspect.signature(type(layer).forward)

    def layer_input(mod, args, kwargs):
        value = signature.bind(mod, *args, **kwargs).arguments["per_layer_input"]
        rec.values[p + "hook_per_layer_input"] = value.detach()
    rec.handles.append(layer.register_forward_pre_hook(layer_input, with_kwargs=True))
    rec.tap(module("ple.w_gate"), p + "ple.hook_pre", "out")
    rec.tap(module("ple.w_out"), p + "ple.hook_post", "in")
    rec.norm(module("ple.ln.w"), p + "ple.ln.", cfg)
    rec.tap(module("ple.ln.w"), p + "hook_ple_out", "out")
