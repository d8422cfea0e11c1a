"""Where from_pretrained puts each part of a model it loads, and reading each tensor there.

`placement` turns `device` / `device_map` / `max_memory` (HF's arguments, HF's computed maps through accelerate) into
part -> device or "disk"; `load_placed` reads each checkpoint tensor straight onto its part's device, or into
accelerate's offload store, and attaches the offload hooks (lens_det.devices.attach_offload). A model already in
memory moves with lens_det.devices.place instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lens_det.devices import DISK, attach_offload, check_device, check_map_devices, offloaded_keys, part_modules, \
    part_of, parts, resolve_device_map
from lens_det.hf.checkpoint import Checkpoint

log = logging.getLogger(__name__)

AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's / HF's computed maps


class _Part(nn.ModuleList):
    """One lens_det part for accelerate's infer_auto_device_map (never split across devices)."""


def _parts_module(model) -> nn.Module:
    """The model's parts as direct children of one module, in forward order, so accelerate allocates them as
    lens_det places them (the per-layer embeddings with the embedding)."""
    parts = nn.Module()
    parts.embed = _Part(part_modules(model, "embed"))
    parts.blocks = model.blocks
    parts.ln_final = _Part(part_modules(model, "ln_final"))
    if model.unembed.weight is not None:
        parts.unembed = _Part([model.unembed])
    return parts


def _auto_device_map(model, how: str, max_memory: dict | None) -> dict:
    """accelerate's map for `how` ("auto", "balanced", "balanced_low_0", "sequential"), the way HF computes it
    (transformers.integrations.accelerate._get_device_map), over lens_det's parts. Blocks are never split."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    parts = _parts_module(model)
    no_split = ["Block", "_Part"]
    if how == "sequential":
        memory = get_max_memory(max_memory)
    else:
        memory = get_balanced_memory(parts, max_memory=max_memory, no_split_module_classes=no_split,
                                     low_zero=how == "balanced_low_0")
    if max_memory is None and "cpu" in memory:  # HF leaves 10% of the CPU memory free when the user sets none
        memory["cpu"] = int(memory["cpu"] * 0.9)
    return infer_auto_device_map(parts, max_memory=memory, no_split_module_classes=no_split)


def placement(model, device, device_map, max_memory) -> dict[str, torch.device | str]:
    """part -> torch.device or "disk", from `device` or `device_map`, every device checked to exist here."""
    every = parts(model.cfg.n_layers, model.unembed.weight is None)
    if device_map is None:
        if max_memory is not None:
            raise ValueError(f"max_memory is read only with a computed device_map ({', '.join(AUTO_DEVICE_MAPS)}); "
                             "pass device_map='auto' too")
        target = check_device(device or "cpu")
        if target.type == "meta":
            raise ValueError("device='meta' would drop the weights this call loads; for an empty model use "
                             "lens_det.from_config(name, device='meta'), or HookedDecoder(config) under "
                             "torch.device('meta')")
        return dict.fromkeys(every, target)
    if device is not None:
        raise ValueError("pass device or device_map, not both (device='cuda:0' is device_map={'': 'cuda:0'})")
    computed = isinstance(device_map, str) and device_map in AUTO_DEVICE_MAPS
    if max_memory is not None and not computed:
        raise ValueError(f"max_memory is read only with a computed device_map ({', '.join(AUTO_DEVICE_MAPS)}), not "
                         f"with device_map={device_map!r}")
    if computed:
        device_map = _auto_device_map(model, device_map, max_memory)
    elif isinstance(device_map, (str, int, torch.device)):
        if isinstance(device_map, str) and device_map != "disk":
            try:
                torch.device(device_map)
            except RuntimeError:
                raise ValueError(f"device_map={device_map!r} is neither a device ('cpu', 'cuda:0', ...) nor one of "
                                 f"{', '.join(AUTO_DEVICE_MAPS)}") from None
        device_map = {"": device_map}
    check_map_devices(device_map)
    plan = resolve_device_map(device_map, model.cfg.n_layers, model.unembed.weight is None)
    for part, value in plan.items():
        if value == DISK:
            continue
        check_device(value, f"device_map[{part!r}]")
        if value.type == "meta":
            raise ValueError(f"device_map puts {part!r} on the meta device, which would drop its weights; use a "
                             "device or 'disk' (offload)")
    if plan["embed"] == DISK:
        size = sum(t.numel() * t.element_size() for m in _parts_module(model).embed for t in m.parameters())
        where = ("the computed device_map sends the embedding to 'disk': give the CPU (or a GPU) at least "
                 f"{size} bytes more in max_memory" if computed else
                 "map 'embed' (HF: model.embed_tokens / transformer.word_embeddings) to 'cpu' or a GPU")
        raise ValueError(f"lens_det keeps the embedding in memory (its device routes the tokens, and a tied "
                         f"unembedding reads it), so it cannot be offloaded to disk: {where}")
    return plan


def load_placed(model, checkpoint: Checkpoint, sources: dict, plan: dict,
          offload_folder) -> list[str]:
    """Read each tensor onto its part's device (or into the offload store) and assign it; attach accelerate's
    offload hooks. Returns the offloaded parts."""
    gpus = sorted({d for d in plan.values() if d != DISK and d.type != "cpu"}, key=lambda d: (d.type, d.index or 0))
    main = gpus[0] if gpus else torch.device("cpu")  # accelerate's main device: offloaded parts execute there
    offload, execution = {}, {}
    for part, where in plan.items():
        kind = DISK if where == DISK else "cpu" if where.type == "cpu" and main.type != "cpu" else None
        if part == "embed" and kind:  # CPU-offloaded embedding: kept on the CPU, where it runs (and a tied unembed)
            kind = None
        if part == "ln_final" and kind:  # d_model weights that route the last activations: on the main device
            kind, where = None, main
        if kind:
            offload[part] = kind
        execution[part] = main if kind else where
    offloaded = {key: part for part in offload for key in offloaded_keys(model, part)}
    meta_state = model.state_dict()
    unexpected = sorted(set(sources) - set(meta_state))
    missing = sorted(set(meta_state) - set(sources))
    if missing or unexpected:
        raise ValueError(f"weight conversion mismatch: missing {missing}, unexpected {unexpected}")
    resident, in_cpu, index = {}, {}, {}
    folder = None if offload_folder is None else Path(offload_folder)
    for key, source in sources.items():
        dtype = meta_state[key].dtype
        part = offloaded.get(key)

        def read(device):
            if isinstance(source, str):
                return checkpoint.load(source, device, dtype)
            return source.to(device=device, dtype=dtype)

        if part is None:
            resident[key] = read(execution[part_of(key)])
        elif offload[part] == "cpu":
            in_cpu[key] = read(torch.device("cpu"))
        elif checkpoint.safetensors and isinstance(source, str):  # read from the checkpoint itself at each forward
            index[key] = {"safetensors_file": str(checkpoint.where[source]), "weight_name": source,
                          "dtype": str(dtype).removeprefix("torch.")}
        else:
            if folder is None:
                raise ValueError(f"device_map offloads {sorted({offloaded[k] for k in offloaded})} to 'disk', and "
                                 f"these weights cannot be read from the checkpoint itself (it is not safetensors): "
                                 "pass offload_folder=<a directory> to write them there, as HF")
            from accelerate.utils import offload_weight

            folder.mkdir(parents=True, exist_ok=True)
            offload_weight(read(torch.device("cpu")), key, str(folder), index=index)
    model.load_state_dict(resident, strict=False, assign=True)
    checkpoint.close()
    if offload:
        from accelerate.utils import OffloadedWeightsLoader

        store = OffloadedWeightsLoader(state_dict=in_cpu, save_folder=None if folder is None else str(folder),
                                       index=index, device=main if main.type != "cpu" else None)
        for part in offload:
            attach_offload(model, part, main, store)
        log.info("offloaded %s (to %s); they load onto %s at each forward", sorted(offload),
                 sorted(set(offload.values())), main)
    return sorted(offload)

