"""Placing blocks on several devices. Activations follow the blocks; each KV-cache entry is created on (and
stays with) its layer's device, so cached and new keys never sit on different devices. A KV-sharing layer moves its
source layer's keys/values to its own device; per-layer embeddings live with the embedding and each block moves
its slice."""

from __future__ import annotations

import re
from typing import Any

import torch

_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)$")
_EMBED = ("embed", "word_embeddings", "embed_tokens", "wte")
# Gemma 4's per-layer embeddings (lens_det's `ple`, HF's three model-level modules) sit with the embedding
_PER_LAYER_EMBED = ("ple", "embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm")
_FINAL = ("ln_final", "ln_f", "norm")
_UNEMBED = ("unembed", "lm_head")
_BLOCK_LISTS = ("blocks", "layers", "h")
_STATELESS = ("rotary_emb",)  # HF modules with no weights lens_det places


def _device(value: Any) -> torch.device:
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


def resolve_device_map(device_map: dict[str, Any], n_layers: int, tied: bool = False) -> dict[str, torch.device]:
    """{"embed", "blocks.{i}", "ln_final", "unembed"} -> device, from a lens_det map or an accelerate map of
    the HF model ("model.layers.3": 0, "transformer.h": "cuda:1", "lm_head": "cpu", "": "cpu" ...). A tied model
    needs no "unembed" entry (it reads the embedding matrix)."""
    placed: dict[str, torch.device] = {}
    default = device_map.get("")
    for key, value in device_map.items():
        if key == "" or key.split(".")[-1] in _STATELESS:
            continue
        last = key.split(".")[-1]
        match = _BLOCK.search(key)
        if match:
            placed[f"blocks.{int(match.group(1))}"] = _device(value)
        elif last in _BLOCK_LISTS:  # every block at once
            placed |= {f"blocks.{i}": _device(value) for i in range(n_layers)}
        elif last in _EMBED or key.endswith("word_embeddings_layernorm"):
            placed.setdefault("embed", _device(value))
        elif last in _PER_LAYER_EMBED:  # follows the embedding unless an embedding key placed it already
            placed.setdefault("embed", _device(value))
        elif last in _FINAL:
            placed["ln_final"] = _device(value)
        elif last in _UNEMBED:
            placed["unembed"] = _device(value)
        elif key not in ("model", "transformer", "model.language_model"):
            raise ValueError(f"device_map key {key!r} names no part of the decoder; use 'embed', 'blocks.N', "
                             "'ln_final', 'unembed' or the HF module names")
    parts = ["embed", *(f"blocks.{i}" for i in range(n_layers)), "ln_final", *([] if tied else ["unembed"])]
    missing = [p for p in parts if p not in placed and default is None]
    if missing:
        raise ValueError(f"device_map places no device for {missing}; add them or a default under ''")
    return {p: placed.get(p, _device(default) if default is not None else None) for p in parts}


def balanced_device_map(n_layers: int, n_devices: int, device_type: str = "cuda") -> dict[str, str]:
    """Blocks split into `n_devices` contiguous groups; embedding on the first device, the rest on the last."""
    per = -(-n_layers // n_devices)
    mapping = {f"blocks.{i}": f"{device_type}:{i // per}" for i in range(n_layers)}
    return {"embed": f"{device_type}:0", **mapping, "ln_final": f"{device_type}:{n_devices - 1}",
            "unembed": f"{device_type}:{n_devices - 1}"}


def place(model, device_map: dict[str, Any]) -> None:
    """Move each part of `model` to its device (in place)."""
    tied = model.unembed.weight is None
    devices = resolve_device_map(device_map, model.cfg.n_layers, tied)
    model.embed.to(devices["embed"])
    if getattr(model, "ple", None) is not None:  # per-layer embeddings read the token ids and the embedding
        model.ple.to(devices["embed"])
    for i, block in enumerate(model.blocks):
        block.to(devices[f"blocks.{i}"])
    model.ln_final.to(devices["ln_final"])
    if not tied:
        model.unembed.to(devices["unembed"])
