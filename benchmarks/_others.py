"""Adapters for benchmarking *other* interpretability toolkits against lens_det.

Two third-party toolkits are wrapped here, both driven from an in-memory
HuggingFace causal LM (random weights built with ``from_config`` are fine; no
hub access is needed or attempted):

* TransformerLens 4.3 ``TransformerBridge`` -- ``bridge_from_hf``,
  ``bridge_forward``, ``bridge_run_with_cache``.
* nnsight 0.8.1 ``NNsight`` envoy -- ``nnsight_from_hf``, ``nnsight_forward``,
  ``nnsight_trace_all_layers`` (and ``nnsight_cache_all_modules``).

Install the optional dependencies with (pin torch so pip cannot swap it)::

    pip install torch==2.13.0 transformers==5.23.0 transformer-lens==4.3.0 nnsight==0.8.1

``transformer_lens`` and ``nnsight`` are imported lazily inside the functions
so this module imports without them.  Importing nnsight has global side effects
(it mounts ``.save`` on ``object`` via a C extension and patches
``torch.Tensor.backward``); keep that in mind when timing other toolkits in the
same process.

Both toolkits *modify the model they wrap in place* (the bridge swaps the HF
submodules for bridge components; nnsight patches every module's ``forward``).
Their constructors here therefore deep-copy the HF model by default, so the
caller's model stays a clean baseline.  Load the HF model with
``attn_implementation="eager"``: the bridge forces eager attention anyway, and
comparing against sdpa gives ~1e-3 fp32 drift that is not a toolkit bug.

Every run function executes under ``torch.no_grad()``.

Run ``python benchmarks/_others.py`` for a self-check on tiny Bloom, Gemma 2
and Gemma 3 models.
"""

from __future__ import annotations

import copy as _copy
import os
from typing import Any, Dict, List, Tuple

# Never let either toolkit reach for the hub.  Must be set before
# huggingface_hub is first imported to take full effect.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

__all__ = [
    "bridge_from_hf",
    "bridge_forward",
    "bridge_run_with_cache",
    "nnsight_from_hf",
    "nnsight_forward",
    "nnsight_trace_all_layers",
    "nnsight_cache_all_modules",
    "decoder_layers_path",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _n_layers(hf_model: torch.nn.Module) -> int:
    cfg = hf_model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(text_cfg.num_hidden_layers)


def decoder_layers_path(hf_model: torch.nn.Module) -> str:
    """Dotted path of the ``ModuleList`` holding the decoder blocks.

    E.g. ``"transformer.h"`` for Bloom, ``"model.layers"`` for Gemma 2/3.
    Found as the first ``ModuleList`` whose length is ``num_hidden_layers``.
    """
    n = _n_layers(hf_model)
    for name, mod in hf_model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name:
            return name
    raise ValueError(f"no ModuleList of length {n} in {type(hf_model).__name__}")


# ---------------------------------------------------------------------------
# TransformerLens TransformerBridge
# ---------------------------------------------------------------------------


def bridge_from_hf(hf_model: torch.nn.Module, copy: bool = True) -> Any:
    """Wrap an in-memory HF causal LM in a TransformerLens ``TransformerBridge``.

    Uses ``transformer_lens.model_bridge.sources.build_bridge_from_module``,
    the loader-agnostic builder behind ``TransformerBridge.boot_transformers``:
    it needs no tokenizer and no hub/disk access.  (``boot_transformers(path,
    hf_model=m)`` also works but insists on loading a tokenizer from ``path``
    unless ``tokenizer=`` is passed; it fails for a bare Bloom checkpoint.)

    The architecture adapter is chosen from the model class name
    (``BloomForCausalLM``, ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM`` ...).
    The bridge is left in its default mode: raw HF weights, logits equal HF's.
    ``bridge.enable_compatibility_mode()`` would fold LayerNorm and centre the
    writing/unembedding weights (HookedTransformer numerics); it is cheap to
    apply (tens of ms on tiny models) but shifts logits by a per-position
    constant (unembed centring) and is not what we benchmark.

    Args:
        hf_model: float32 HF ``*ForCausalLM`` (eager attention recommended).
        copy: deep-copy the model first (default).  With ``copy=False`` the
            caller's model is rewired in place (its own forward still returns
            the same logits, but runs through bridge components).
    """
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    model = _copy.deepcopy(hf_model) if copy else hf_model
    model.eval()
    param = next(model.parameters())
    bridge = build_bridge_from_module(
        model,
        type(model).__name__,
        hf_config=model.config,
        dtype=param.dtype,
        device=param.device,
        model_name=getattr(model.config, "_name_or_path", "") or "external",
    )
    bridge.eval()
    return bridge


def bridge_forward(bridge: Any, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain bridge forward (no hooks attached); returns logits ``[batch, seq, vocab]``."""
    with torch.no_grad():
        return bridge(tokens, attention_mask=mask, return_type="logits")


def bridge_run_with_cache(
    bridge: Any, tokens: torch.Tensor, mask: torch.Tensor
) -> Tuple[torch.Tensor, Any]:
    """``run_with_cache`` capturing every hook point (``names_filter=None``).

    Returns ``(logits, cache)`` where ``cache`` is a TransformerLens
    ``ActivationCache`` (``len(cache)`` hook names, e.g. 94 for a 2-layer Bloom).
    """
    with torch.no_grad():
        return bridge.run_with_cache(tokens, attention_mask=mask)


# ---------------------------------------------------------------------------
# nnsight
# ---------------------------------------------------------------------------


def nnsight_from_hf(hf_model: torch.nn.Module, copy: bool = True) -> Any:
    """Wrap an in-memory HF model in ``nnsight.NNsight`` (generic module envoy).

    ``NNsight`` needs no tokenizer; inputs are passed as ``input_ids=`` /
    ``attention_mask=`` keyword tensors.  (``nnsight.TransformersModel`` /
    the deprecated ``LanguageModel`` wrap the model in a transformers pipeline
    and raise "Impossible to guess which tokenizer to use" unless a tokenizer
    is supplied, so they are not used here.)

    Args:
        hf_model: the HF model.
        copy: deep-copy first (default); nnsight patches ``forward`` on every
            submodule of the model it wraps.
    """
    from nnsight import NNsight

    model = _copy.deepcopy(hf_model) if copy else hf_model
    model.eval()
    return NNsight(model)


def nnsight_forward(nn_model: Any, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A trace with no interventions that saves only the logits.

    This is nnsight's minimum per-call cost (trace capture + interleaving);
    calling ``nn_model(...)`` outside a trace would just be the HF forward.
    """
    with torch.no_grad():
        with nn_model.trace(input_ids=tokens, attention_mask=mask) as tracer:
            logits = tracer.result.logits.save()
    return logits


def nnsight_trace_all_layers(
    nn_model: Any, tokens: torch.Tensor, mask: torch.Tensor
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Trace that saves every decoder layer's output hidden state and the logits.

    Roughly ``output_hidden_states=True`` (minus the embedding output).
    Module outputs must be read in execution order, so the layers are read
    before the final output.  Layers returning tuples (Bloom) are reduced to
    their first element.  Returns ``(logits, [hidden_layer_0, ...])``.
    """
    import nnsight

    path = decoder_layers_path(nn_model._module)
    layers_env = nn_model
    for part in path.split("."):
        layers_env = getattr(layers_env, part)
    with torch.no_grad():
        with nn_model.trace(input_ids=tokens, attention_mask=mask) as tracer:
            hidden = nnsight.save([layer.output for layer in layers_env])
            logits = tracer.result.logits.save()
    hidden = [h[0] if isinstance(h, tuple) else h for h in hidden]
    return logits, hidden


def nnsight_cache_all_modules(
    nn_model: Any, tokens: torch.Tensor, mask: torch.Tensor
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """``tracer.cache()`` over every submodule's output (closest to run_with_cache).

    Returns ``(logits, cache)``; ``cache`` is an nnsight ``CacheView`` keyed by
    module path (``"model.model.layers.0.self_attn.q_proj"`` ...); read values
    with ``cache[key].output``.  Captured tensors are detached and kept on the
    model's device (``device=None``).
    """
    with torch.no_grad():
        with nn_model.trace(input_ids=tokens, attention_mask=mask) as tracer:
            cache = tracer.cache(device=None)
            logits = tracer.result.logits.save()
    return logits, cache


# ---------------------------------------------------------------------------
# self-check
# ---------------------------------------------------------------------------


def _tiny_models() -> Dict[str, torch.nn.Module]:
    from transformers import (
        AutoModelForCausalLM,
        BloomConfig,
        Gemma2Config,
        Gemma3TextConfig,
    )

    gemma_kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=100,
        sliding_window=4,
    )
    cfgs = {
        "bloom": BloomConfig(hidden_size=64, n_head=4, n_layer=2, vocab_size=100),
        "gemma2": Gemma2Config(**gemma_kw),
        "gemma3": Gemma3TextConfig(**gemma_kw),
    }
    torch.manual_seed(0)
    return {
        name: AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        for name, cfg in cfgs.items()
    }


def _main() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (2, 8))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # left padding on row 1
    real = mask.bool()

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a - b).abs()[real].max().item()  # non-pad positions only

    for name, hf in _tiny_models().items():
        with torch.no_grad():
            ref = hf(input_ids=tokens, attention_mask=mask, output_hidden_states=True)

        bridge = bridge_from_hf(hf)
        d_fwd = diff(bridge_forward(bridge, tokens, mask), ref.logits)
        logits, cache = bridge_run_with_cache(bridge, tokens, mask)
        d_cache = diff(logits, ref.logits)
        n_hooks = len(bridge.hook_dict)

        nn_model = nnsight_from_hf(hf)
        d_nn = diff(nnsight_forward(nn_model, tokens, mask), ref.logits)
        nn_logits, hidden = nnsight_trace_all_layers(nn_model, tokens, mask)
        d_nn_tr = diff(nn_logits, ref.logits)
        # HF applies the final norm to the last hidden state; compare earlier layers.
        d_hid = max(
            diff(h, r) for h, r in zip(hidden[:-1], ref.hidden_states[1:-1])
        ) if len(hidden) > 1 else float("nan")
        _, nn_cache = nnsight_cache_all_modules(nn_model, tokens, mask)

        print(
            f"{name:7s} bridge fwd {d_fwd:.2e} | bridge rwc {d_cache:.2e} "
            f"({len(cache)}/{n_hooks} hooks) | nnsight fwd {d_nn:.2e} | "
            f"nnsight layers {d_nn_tr:.2e} (hidden {d_hid:.2e}, {len(hidden)} layers) | "
            f"nnsight cache {len(list(nn_cache.keys()))} modules"
        )


if __name__ == "__main__":
    _main()
