"""Placing blocks on several devices. Activations follow the blocks; each KV-cache entry is created on (and
stays with) its layer's device, so cached and new keys never sit on different devices. A KV-sharing layer moves its
source layer's keys/values to its own device; per-layer embeddings live with the embedding and each block moves
its slice.

Two ways in:

- `place(model, device_map)` (`model.place`) moves a loaded model's parts between real devices;
- `from_pretrained(..., device_map=...)` (lens_det.loading) also offloads: parts mapped to "disk" (and, when a
  GPU is in the map, to "cpu") keep their weights on the meta device and load them at each forward through
  accelerate's `AlignDevicesHook` (`attach_offload` here), as HF models dispatched by accelerate do.

A part is "embed" (with Gemma 4's per-layer embeddings), "blocks.{i}", "ln_final" or "unembed" (untied models).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lens_det.hf import FAMILIES

def part_of(key: str) -> str:
    """The part a state-dict key belongs to ("blocks.3.attn.w_q" -> "blocks.3", "ple.W_E" -> "embed")."""
    head = key.split(".")[0]
    if head == "blocks":
        return ".".join(key.split(".")[:2])
    return _FOLLOWERS.get(head, head)


# model-level modules that live with a part: the per-layer embeddings and AltUp's stream projections (Gemma 3n) with
# the embedding, the streams' collapse with the final norm
_FOLLOWERS = {"ple": "embed", "streams_in": "embed", "streams_out": "ln_final"}


def _followers(model, part: str) -> list[nn.Module]:
    return [getattr(model, name) for name, home in _FOLLOWERS.items() if home == part
            and getattr(model, name, None) is not None]


def _module_names() -> tuple[dict[str, str], dict[str, str], set[str], set[str], set[str]]:
    """Device-map key names, lens_det's and each HF family's (from the lens<->HF tables in lens_det.hf): (module ->
    the part it places, module -> the part it follows (a module beside the part's main one, such as Bloom's
    word_embeddings_layernorm or Gemma 4's per-layer embeddings), block-list names, containers (HF's names of the
    whole decoder), stateless HF modules)."""
    exact = {"embed": "embed", "ln_final": "ln_final", "unembed": "unembed"}
    aux = dict(_FOLLOWERS)
    lists, containers, stateless = {"blocks"}, set(), set()
    for family in set(FAMILIES.values()):
        for hf_key, lens_key in family.MODEL_WEIGHTS.items():
            module, part = hf_key.rsplit(".", 1)[0], part_of(lens_key)
            (exact if lens_key.rsplit(".", 1)[0] == part else aux)[module] = part
        lists.add(family.LAYERS)
        containers |= {name for prefix in family.DECODER_PREFIXES for name in prefix.split(".") if name}
        stateless |= set(family.STATELESS)
    return exact, aux, lists, containers, stateless


_PART_OF, _FOLLOWS, _BLOCK_LISTS, _CONTAINERS, _STATELESS = _module_names()
_BLOCK = re.compile(rf"(?:^|\.)(?:{'|'.join(sorted(_BLOCK_LISTS))})\.(\d+)$")  # "model.layers.3", "blocks.3"
DISK = "disk"

# how specific a key is: a more specific key wins over a less specific one whatever the dict order (equal: first wins)
_DEFAULT, _CONTAINER, _LIST, _AUX, _EXACT = range(5)


def _device(value: Any, key: str = "") -> torch.device | str:
    """A device-map value -> torch.device, or "disk". Ints are CUDA indices, as in accelerate's maps."""
    if isinstance(value, bool):
        raise ValueError(f"device_map[{key!r}]={value!r} is not a device; use e.g. 'cpu', 'cuda:0', 0 or 'disk'")
    if isinstance(value, int):
        return torch.device("cuda", value)
    if value == DISK:
        return DISK
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map[{key!r}]={value!r} is not a device; use e.g. 'cpu', 'cuda:0', 0 or "
                         "'disk'") from None


def check_device(device: Any, what: str = "device") -> torch.device:
    """`device` as a torch.device; a CUDA device this machine does not have is a one-line ValueError (torch's own
    error is a bare AssertionError from deep inside `.to`)."""
    value = _device(device, what) if not isinstance(device, torch.device) else device
    shown = str(device) if isinstance(device, torch.device) else device
    if value == DISK:
        raise ValueError(f"{what}='disk' is only a device_map value (offload); use 'cpu' or a GPU")
    if value.type == "cuda":
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not available:
            raise ValueError(f"{what}={shown!r} names a CUDA device, but no CUDA device is available on this "
                             "machine (torch.cuda.is_available() is False); use 'cpu'")
        if value.index is not None and value.index >= available:
            raise ValueError(f"{what}={shown!r}, but this machine has {available} CUDA device(s) "
                             f"(cuda:0 to cuda:{available - 1})")
    return value


def check_map_devices(device_map: dict[str, Any]) -> None:
    """Every CUDA device a device map names exists here (checked on the values as written, before resolution)."""
    for key, value in device_map.items():
        if _device(value, key) != DISK:
            check_device(value, f"device_map[{key!r}]")


def parts(n_layers: int, tied: bool) -> list[str]:
    return ["embed", *(f"blocks.{i}" for i in range(n_layers)), "ln_final", *([] if tied else ["unembed"])]


def resolve_device_map(device_map: dict[str, Any], n_layers: int, tied: bool = False,
                       ignore_unknown: bool = False) -> dict[str, torch.device | str]:
    """{"embed", "blocks.{i}", "ln_final", "unembed"} -> device (or "disk"), from a lens_det map or an accelerate
    map of the HF model ("model.layers.3": 0, "transformer.h": "cuda:1", "lm_head": "cpu", "model": 0, "": "cpu"
    ...). The most specific key wins ("model.layers.3" over "model.layers" over "model" over ""). A tied model needs
    no "unembed" entry (it reads the embedding matrix). `ignore_unknown`: skip keys that name no decoder part (an
    accelerate map of a multimodal model also places its vision tower) instead of refusing them."""
    if not isinstance(device_map, dict):
        raise TypeError(f"device_map must be a dict (or 'auto', a device), got {type(device_map).__name__}")
    chosen: dict[str, tuple[int, torch.device | str]] = {}
    every = parts(n_layers, tied)

    def assign(names, rank, value):
        for name in names:
            if name in every and (name not in chosen or rank > chosen[name][0]):
                chosen[name] = (rank, value)

    for key, value in device_map.items():
        if not isinstance(key, str):
            raise TypeError(f"device_map keys are module names (str), got {key!r}")
        last = key.split(".")[-1]
        if last in _STATELESS:
            continue
        match = _BLOCK.search(key)
        if key == "":
            assign(every, _DEFAULT, _device(value, key))
        elif match:
            assign([f"blocks.{int(match.group(1))}"], _EXACT, _device(value, key))
        elif last in _BLOCK_LISTS:  # every block at once
            assign([f"blocks.{i}" for i in range(n_layers)], _LIST, _device(value, key))
        elif last in _PART_OF:
            assign([_PART_OF[last]], _EXACT, _device(value, key))
        elif last in _FOLLOWS:  # follows the embedding unless an embedding key placed it
            assign([_FOLLOWS[last]], _AUX, _device(value, key))
        elif last in _CONTAINERS:
            assign(every, _CONTAINER, _device(value, key))
        elif not ignore_unknown:
            raise ValueError(f"device_map key {key!r} names no part of the decoder; use 'embed', 'blocks.N', "
                             "'ln_final', 'unembed' or the HF module names")
    missing = [p for p in every if p not in chosen]
    if missing:
        raise ValueError(f"device_map places no device for {missing}; add them or a default under ''")
    return {p: chosen[p][1] for p in every}


def balanced_device_map(n_layers: int, n_devices: int, device_type: str = "cuda") -> dict[str, str]:
    """Blocks split into `n_devices` contiguous groups; embedding on the first device, the rest on the last."""
    per = -(-n_layers // n_devices)
    mapping = {f"blocks.{i}": f"{device_type}:{i // per}" for i in range(n_layers)}
    return {"embed": f"{device_type}:0", **mapping, "ln_final": f"{device_type}:{n_devices - 1}",
            "unembed": f"{device_type}:{n_devices - 1}"}


def part_modules(model, part: str) -> list[nn.Module]:
    """The modules that hold a part's weights."""
    if part.startswith("blocks."):
        return [model.blocks[int(part.split(".")[1])]]
    return [getattr(model, part)] + _followers(model, part)


def meta_parts(model) -> dict[str, bool]:
    """Parts whose weights are (some of them) on the meta device -> whether accelerate offloads them (their weights
    load at each forward) rather than never having been loaded."""
    out = {}
    for part in parts(model.cfg.n_layers, model.unembed.weight is None):
        modules = part_modules(model, part)
        if any(t.is_meta for m in modules for t in [*m.parameters(), *m.buffers()]):
            out[part] = any(hasattr(sub, "_hf_hook") for m in modules for sub in m.modules())
    return out


def place(model, device_map: dict[str, Any]) -> None:
    """Move each part of `model` to its device (in place). Refused, before anything moves, when the move would lose
    or never load weights: a "meta" target, a part whose weights are on meta (offloaded, or never loaded), "disk"
    (offload is chosen at load time), or a CUDA device this machine does not have."""
    tied = model.unembed.weight is None
    devices = resolve_device_map(device_map, model.cfg.n_layers, tied)
    check_map_devices(device_map)
    to_disk = [p for p, d in devices.items() if d == DISK]
    if to_disk:
        raise ValueError(f"place moves weights between devices and cannot offload {to_disk} to 'disk': offload at "
                         "load time with lens_det.from_pretrained(directory, device_map=..., offload_folder=...)")
    to_meta = [p for p, d in devices.items() if d.type == "meta"]
    if to_meta:
        raise ValueError(f"device_map puts {to_meta} on the meta device, which would drop their weights (meta tensors "
                         "hold no data); for an empty model use lens_det.from_config(name, device='meta'), and to free "
                         "memory delete the model instead")
    on_meta = meta_parts(model)
    if on_meta:
        offloaded = [p for p, hooked in on_meta.items() if hooked]
        empty = [p for p, hooked in on_meta.items() if not hooked]
        why = []
        if offloaded:
            why.append(f"{offloaded} are offloaded (accelerate loads their weights at each forward); to change the "
                       "placement, load again with lens_det.from_pretrained(directory, device_map=<new map>)")
        if empty:
            why.append(f"{empty} have weights on the meta device (never loaded), and moving them would leave them "
                       "uninitialised; load weights first (model.to_empty(device=...) then "
                       "model.load_state_dict(...)), or load with lens_det.from_pretrained(directory, device_map=...)")
        raise ValueError("cannot place this model: " + "; ".join(why))
    for module in part_modules(model, "embed"):  # per-layer embeddings read the token ids and the embedding
        module.to(devices["embed"])
    for i, block in enumerate(model.blocks):
        block.to(devices[f"blocks.{i}"])
    for module in part_modules(model, "ln_final"):
        module.to(devices["ln_final"])
    if not tied:
        model.unembed.to(devices["unembed"])


def offloaded_keys(model, part: str) -> list[str]:
    """The state-dict keys of `part` that `attach_offload` loads at each forward: every weight of the part except
    what lens_det's forward reads to route activations, which stays resident on the execution device (it is
    d_model-sized): a block's ln1 and its own buffers (Gemma 4's layer_scalar). The embedding and ln_final are never
    offloaded (their devices route the tokens and the final activations)."""
    if part in ("embed", "ln_final"):
        return []
    if part == "unembed":
        return [f"unembed.{n}" for n, _ in model.unembed.named_parameters()]
    block = part_modules(model, part)[0]
    return [f"{part}.{name}.{n}" for name, child in block.named_children() if name != "ln1"
            for n, _ in child.named_parameters()]


def attach_offload(model, part: str, execution_device: torch.device, weights_map) -> None:
    """Offload one part with accelerate: each of its weight-holding modules (but a block's ln1) gets an
    `AlignDevicesHook` that loads its weights from `weights_map` (keys: the model's state-dict names) onto
    `execution_device` before its forward, moves its inputs there, and puts the weights back on meta after."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import PrefixedDataset

    if part == "unembed":
        hooked = [("unembed", model.unembed)]
    else:
        block = part_modules(model, part)[0]
        hooked = [(f"{part}.{name}", child) for name, child in block.named_children()
                  if name != "ln1" and any(True for _ in child.parameters())]
    for prefix, module in hooked:
        hook = AlignDevicesHook(execution_device=execution_device, offload=True, io_same_device=False,
                                weights_map=PrefixedDataset(weights_map, prefix + "."), offload_buffers=False,
                                place_submodules=True)
        add_hook_to_module(module, hook)
