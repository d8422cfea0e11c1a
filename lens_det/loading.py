"""Loading: from_pretrained (hub name, local directory or HF model object) and from_config (random weights).

from_pretrained builds the model on the meta device (shapes only, no memory), reads the checkpoint's tensors one
at a time (safetensors headers first, each tensor when it is placed) and assigns each straight onto its device; a
`device_map` may also offload parts to the CPU or disk through accelerate (lens_det.placement, lens_det.devices).
docs/architecture.md, "Loading", describes the whole path.
"""

from __future__ import annotations

import contextlib
import difflib
from pathlib import Path
from typing import Any

import torch

from lens_det.hf import family_for, hf_attn_implementation, hf_experts_implementation, resolve_attn_implementation
from lens_det.hf.checkpoint import (Checkpoint, as_dtype, check_causal_lm_head, check_shapes, checkpoint_dtype,
                                    convert_state, lazy_conversion, load_tokenizer, local_dir)
from lens_det.inputs import check_dtype
from lens_det.model import HookedDecoder
from lens_det.placement import load_placed, placement
from lens_det.presets import hf_config_from_name
from lens_det.tokenizer import char_tokenizer

_HUB = ("download the checkpoint with huggingface_hub.snapshot_download(repo_id, revision=..., cache_dir=..., "
        "token=...) and pass the directory it returns")
_QUANTIZED = ("quantized loading is not supported (lens_det matches HF's unquantized model bit for bit): load in "
              "bfloat16 (dtype=torch.bfloat16 or dtype='auto') and, if it does not fit, offload with device_map='auto'")
_TENSOR_PARALLEL = ("tensor parallelism is not supported; spread the layers over GPUs with device_map='auto' (or a "
                    "dict such as {'blocks.0': 'cuda:0', ..., '': 'cuda:1'})")
_DROP = "transformers ignores it too; drop it"
_DTYPE_FIX = "pass dtype=torch.float32 or dtype=torch.bfloat16 (the weights are cast to it)"

# Keywords of transformers' from_pretrained that lens_det does not take, each with what to do instead.
HF_KEYWORDS = {
    "revision": _HUB, "cache_dir": _HUB, "token": _HUB, "use_auth_token": _HUB, "force_download": _HUB,
    "proxies": _HUB,
    "local_files_only": "pass a local directory: lens_det goes to the hub only when name_or_path is not a directory",
    "subfolder": "pass the subfolder's own path (os.path.join(directory, subfolder))",
    "variant": "pass a directory holding that variant's weight files only",
    "use_safetensors": ("lens_det reads *.safetensors when the directory has them, else pytorch_model*.bin; pass a "
                        "directory with the format you want"),
    "weights_only": "lens_det always reads pytorch_model*.bin with torch.load(weights_only=True); drop it",
    "trust_remote_code": ("lens_det never runs a checkpoint's code: it has its own implementation of the supported "
                          "families (Bloom, Gemma 1-4, VaultGemma); drop it"),
    "quantization_config": _QUANTIZED, "load_in_8bit": _QUANTIZED, "load_in_4bit": _QUANTIZED,
    "gguf_file": ("GGUF is not supported: convert it to safetensors (HF from_pretrained + save_pretrained) "
                  "and pass that"),
    "tp_plan": _TENSOR_PARALLEL, "tp_size": _TENSOR_PARALLEL, "device_mesh": _TENSOR_PARALLEL,
    "distributed_config": _TENSOR_PARALLEL,
    "offload_buffers": "lens_det keeps buffers in memory (at most one scalar per layer); drop it",
    "offload_state_dict": _DROP, "_fast_init": _DROP, "mirror": _DROP, "from_tf": _DROP, "from_flax": _DROP,
    "output_attentions": ("attention patterns are hook points: logits, cache = model.run_with_cache(tokens), then "
                          "cache['pattern', layer] (blocks.{i}.attn.hook_pattern)"),
    "output_hidden_states": ("the residual stream is a hook point: logits, cache = model.run_with_cache(tokens), then "
                             "cache['resid_post', layer]"),
    "use_cache": "pass kv_cache=model.new_cache() to the forward (or use model.generate)",
    "return_dict": "the forward returns logits (return_type='logits', 'loss' or 'both')",
    "config": ("lens_det reads config.json from the directory: edit it there, or convert an HF model built with your "
               "config: lens_det.from_hf_model(AutoModelForCausalLM.from_pretrained(directory, config=config))"),
    "state_dict": ("load weights into the model with model.load_state_dict(state_dict), or convert an HF model: "
                   "lens_det.from_hf_model(hf_model)"),
    "key_mapping": ("checkpoints with renamed weights are not read directly: load with HF "
                    "(AutoModelForCausalLM.from_pretrained(directory, key_mapping=...)) and use "
                    "lens_det.from_hf_model"),
    "ignore_mismatched_sizes": "not supported: every tensor must have the shape its config gives",
    "output_loading_info": "not supported: loading raises when a tensor is missing or unexpected",
    "adapter_name": "merge the adapter first (peft: model.merge_and_unload(), then save_pretrained) and pass that",
    "adapter_kwargs": "merge the adapter first (peft: model.merge_and_unload(), then save_pretrained) and pass that",
    "generation_config": "pass generation options to model.generate(...)",
    "use_kernels": "hub kernels are not supported (they change the numerics); drop it",
    "kernel_config": "hub kernels are not supported (they change the numerics); drop it",
}
# from_config / from_hf_model: loading keywords that only from_pretrained takes
_IN_MEMORY = ("builds the model in memory; spread it over devices with model.place(device_map) (offloading to 'disk' "
              "needs a checkpoint: save_pretrained it and load with lens_det.from_pretrained(directory, "
              "device_map=..., offload_folder=...))")
_LOADING_ONLY = {"device_map": _IN_MEMORY, "max_memory": _IN_MEMORY, "offload_folder": _IN_MEMORY,
                 "low_cpu_mem_usage": "builds the model in memory; drop it"}


def _check_kwargs(kwargs: dict, function: str, takes: tuple[str, ...]) -> dict[str, bool]:
    """The weight-processing keywords of `kwargs`; anything else is a TypeError that says what to do instead."""
    from lens_det.tl.weight_processing import STEPS

    refused = []
    for key in kwargs:
        if key in HF_KEYWORDS:
            refused.append(f"{key!r} (a transformers from_pretrained keyword): {HF_KEYWORDS[key]}")
        elif key in _LOADING_ONLY and function != "from_pretrained":
            refused.append(f"{key!r} (a from_pretrained keyword): {function} {_LOADING_ONLY[key]}")
    if refused:
        raise TypeError(f"{function}() does not take " + "; ".join(refused))
    unknown = sorted(set(kwargs) - set(STEPS))
    if unknown:
        close = sorted({m for k in unknown for m in difflib.get_close_matches(k, [*takes, *STEPS], n=1)})
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        overrides = (" Config overrides (transformers' from_pretrained(dir, sliding_window=...)) are not taken: edit "
                     "config.json, or convert an HF model loaded with them: "
                     "lens_det.from_hf_model(AutoModelForCausalLM.from_pretrained(directory, ...))."
                     if function == "from_pretrained" else "")
        raise TypeError(f"{function}() got unexpected keyword argument(s) {unknown}{hint}. It takes "
                        f"{', '.join(takes)}, and the weight-processing options are {', '.join(STEPS)} "
                        f"(TransformerLens's, off by default).{overrides}")
    return kwargs


def _process(model: HookedDecoder, steps: dict[str, bool]) -> HookedDecoder:
    """Apply TransformerLens weight processing chosen by keyword at load time (all off by default: HF-exact)."""
    from lens_det.tl.weight_processing import STEPS

    if any(steps.values()):
        model.process_weights_(**{step: bool(steps.get(step, False)) for step in STEPS})
    return model


def _dtype_or_alias(dtype, torch_dtype):
    """`torch_dtype` is transformers' old name of `dtype` (still accepted there)."""
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError("pass dtype or torch_dtype (its old transformers name), not both")
        return torch_dtype
    return dtype


def _refuse_meta_context(function: str) -> None:
    if torch.get_default_device().type == "meta":
        raise ValueError(f"{function} is called under torch.device('meta') (or torch.set_default_device('meta')), "
                         "which would drop the weights it loads. For an empty (meta) model use "
                         "lens_det.from_config(name) there, or HookedDecoder(config) under torch.device('meta'); "
                         f"otherwise call {function} outside that context (loading already builds on meta, then "
                         "assigns each weight)")


def from_hf_model(hf_model: Any, dtype: torch.dtype | str | None = None, device=None,
                  share_weights: bool = False, *, torch_dtype: torch.dtype | str | None = None,
                  attn_implementation: str | None = None, **processing: bool) -> HookedDecoder:
    """Convert an in-memory HF causal LM (e.g. BloomForCausalLM). dtype defaults to the HF model's (so does "auto");
    `torch_dtype` is its old transformers name. `attn_implementation` ("eager" or "sdpa") defaults to the HF
    model's own (`config._attn_implementation`), so the two models compute the same thing.

    The lens_det model gets its own copy of the weights, so editing one model never changes the other (a parity
    report against the HF model then sees the edit). `share_weights=True` shares storage where dtype and layout
    allow (no copy; an in-place edit of either model then changes both).

    `processing`: TransformerLens's weight processing by keyword (fold_ln=True, center_writing_weights=True,
    center_unembed=True, fold_value_biases=True, refactor_factored_attn_matrices=True); all off by default, unlike
    TransformerLens, because a processed model is no longer HF-exact. See HookedDecoder.process_weights_.
    """
    from transformers import PreTrainedModel

    processing = _check_kwargs(processing, "from_hf_model", ("dtype", "torch_dtype", "device", "share_weights",
                                                             "attn_implementation"))
    if not isinstance(hf_model, PreTrainedModel):
        raise TypeError(f"from_hf_model takes a transformers PreTrainedModel (e.g. GemmaForCausalLM), got "
                        f"{type(hf_model).__name__}; for a checkpoint name or directory use from_pretrained")
    check_causal_lm_head(type(hf_model).__name__, getattr(hf_model.config, "model_type", None))
    _refuse_meta_context("from_hf_model")
    dtype = _dtype_or_alias(dtype, torch_dtype)
    dtype = check_dtype((None if dtype == "auto" else as_dtype(dtype)) or next(hf_model.parameters()).dtype,
                        _DTYPE_FIX)
    copy = not share_weights or any(processing.values())  # processing writes in place: never into the HF model
    model = _build(hf_model.config, hf_model.state_dict(), dtype, device, copy=copy, source=type(hf_model).__name__)
    if model.config.n_experts:
        model.experts_implementation = hf_experts_implementation(hf_model)
    model.attn_implementation = attn_implementation or hf_attn_implementation(hf_model)
    model.name = getattr(hf_model, "name_or_path", "") or None  # the checkpoint it was loaded from, if any
    return _process(model, processing)


def from_pretrained(
    name_or_path: str | Path | Any,
    dtype: torch.dtype | str | None = None,
    device=None,
    tokenizer: bool = True,
    experts_implementation: str | None = None,
    *,
    device_map: str | dict | int | torch.device | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    low_cpu_mem_usage: bool = True,
    torch_dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    **kwargs: bool,
) -> HookedDecoder:
    """Load a checkpoint: an HF hub name (needs network or the local HF cache), a local `save_pretrained`
    directory, or an HF model object. Only the decoder (text) weights are read, straight from the weight files.

    Args:
        name_or_path: e.g. "bigscience/bloom-560m", "/path/to/dir", or a `PreTrainedModel`.
        dtype: the model dtype; weights are cast to it, as HF `from_pretrained(dtype=...)` does. The default is
            torch.float32 (TransformerLens's default); pass dtype="auto" to match HF 5's from_pretrained default,
            the checkpoint's dtype (config.json's dtype / torch_dtype, else the dtype of the first floating-point
            tensor stored). `torch_dtype` is its old transformers name (pass one of the two).
        device: put the whole model on this device ("cpu", "cuda:0", ...). Default: cpu.
        tokenizer: attach the checkpoint's tokenizer when it has one.
        experts_implementation: MoE models: "grouped_mm" (HF's default, also when None) or "eager", to match an HF
            model loaded with the same `experts_implementation` (an HF model object brings its own).
        device_map: where each part goes, as HF/accelerate's `device_map` (instead of `device`): "auto",
            "balanced", "balanced_low_0" or "sequential" (computed by accelerate from the free memory, or
            `max_memory`; on a machine without a GPU, "auto" puts everything on the CPU), a device ("cpu",
            "cuda:1", 0), or a dict in HF module names ({"model.embed_tokens": 0, "model.layers.0": 0, ...,
            "lm_head": "cpu"}) or lens_det names ("embed", "blocks.3", "ln_final", "unembed", "" for the rest).
            Values are devices, GPU indices or "disk". As with accelerate, parts on "disk" (and on "cpu" when a GPU
            is in the map) are offloaded: their weights stay on the meta device and load onto the main device (the
            first GPU, else the CPU) at each forward. lens_det keeps the embedding in memory (on "cpu" it runs
            there), and the norms its forward routes activations by (ln_final, each block's ln1) on the execution
            device. With safetensors, disk-offloaded weights are read from the checkpoint itself.
        max_memory: with a computed device_map, the memory per device ({0: "20GiB", "cpu": "60GiB"}), as HF.
        offload_folder: where disk-offloaded weights are written when they cannot be read from the checkpoint
            itself (pytorch_model*.bin checkpoints), as HF.
        low_cpu_mem_usage: accepted for HF compatibility; loading always builds on the meta device and reads one
            tensor at a time (True and False behave the same).
        attn_implementation: "eager" or "sdpa" (settable later as model.attn_implementation). The default is what
            HF's from_pretrained picks for the family: "sdpa" for Gemma 1, 3 and 4, "eager" for Bloom, Gemma 2 and
            VaultGemma (which HF runs eager-only, and which refuse "sdpa"). An HF model object brings its own.
        kwargs: TransformerLens weight processing by keyword (fold_ln=True, ...), off by default; see
            from_hf_model. Other transformers keywords (revision, trust_remote_code, quantization_config, ...) raise
            a TypeError that says what to do instead.
    """
    processing = _check_kwargs(kwargs, "from_pretrained", (
        "dtype", "torch_dtype", "device", "device_map", "max_memory", "offload_folder", "low_cpu_mem_usage",
        "tokenizer", "experts_implementation", "attn_implementation"))
    if not isinstance(low_cpu_mem_usage, bool):
        raise TypeError(f"low_cpu_mem_usage must be True or False, got {low_cpu_mem_usage!r}")
    dtype = _dtype_or_alias(dtype, torch_dtype)
    if not isinstance(name_or_path, (str, Path)):
        if device_map is not None or max_memory is not None or offload_folder is not None:
            raise ValueError("device_map / max_memory / offload_folder apply to checkpoints; an in-memory HF model "
                             "converts with lens_det.from_hf_model(hf_model), then model.place(device_map) moves its "
                             "parts (or pass the checkpoint directory here)")
        model = from_hf_model(name_or_path, dtype=torch.float32 if dtype is None else dtype, device=device,
                              attn_implementation=attn_implementation, **processing)
        return _set_experts(model, experts_implementation)
    _refuse_meta_context("from_pretrained")
    directory = local_dir(str(name_or_path))
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(directory)
    check_causal_lm_head((getattr(hf_cfg, "architectures", None) or [None])[0], getattr(hf_cfg, "model_type", None))
    checkpoint = Checkpoint(directory)
    dtype = checkpoint_dtype(hf_cfg, checkpoint) if dtype == "auto" else (as_dtype(dtype) or torch.float32)
    check_dtype(dtype, _DTYPE_FIX)
    family = family_for(hf_cfg)
    cfg = family.config_from_hf(hf_cfg)
    implementation = resolve_attn_implementation(cfg, attn_implementation)  # refused before any weight is read
    sources = lazy_conversion(family, checkpoint, cfg, str(directory))
    with torch.device("meta"):
        model = HookedDecoder(cfg, dtype=dtype)
    check_shapes(model, checkpoint, sources, hf_cfg)
    plan = placement(model, device, device_map, max_memory)
    offloaded = load_placed(model, checkpoint, sources, plan, offload_folder)
    if offloaded and any(processing.values()):
        raise ValueError(f"weight processing rewrites every weight in place, but {offloaded} are offloaded (their "
                         "weights load at each forward and are never held); process a model loaded without offload")
    model.attn_implementation = implementation
    model.name = str(name_or_path)
    if tokenizer:
        model.tokenizer = load_tokenizer(directory)
    return _process(_set_experts(model, experts_implementation), processing)


def _set_experts(model: HookedDecoder, experts_implementation: str | None) -> HookedDecoder:
    if experts_implementation is not None:
        model.experts_implementation = experts_implementation  # validated there; refused without experts
    return model


def from_config(name: str, seed: int = 0, dtype: torch.dtype | str | None = None, device=None,
                experts_implementation: str | None = None, *, torch_dtype: torch.dtype | str | None = None,
                attn_implementation: str | None = None, **processing: bool) -> HookedDecoder:
    """A model with random weights for a named config (model_configs): an HF model of that config is
    initialised with `seed` and converted, so the result matches HF for the same seed. It carries an offline
    character tokenizer (lens_det.tokenizer), so string inputs work without a model hub. dtype: torch.float32 by
    default ("auto": the config's dtype, else float32; `torch_dtype` is its old transformers name).
    `experts_implementation`, `attn_implementation`: see from_pretrained (the same defaults as HF's
    `from_config`: sdpa where the family supports it). `processing`: TransformerLens weight processing by keyword
    (fold_ln=True, ...), off by default; see from_hf_model.

    On the meta device (`device="meta"`, or called under `with torch.device("meta")`) it returns an empty model:
    every weight on meta with its shape and dtype, no HF model built and no memory used. Give it storage with
    `model.to_empty(device="cpu")` and load weights with `model.load_state_dict(...)`."""
    from transformers import AutoModelForCausalLM

    processing = _check_kwargs(processing, "from_config", ("seed", "dtype", "torch_dtype", "device",
                                                           "experts_implementation", "attn_implementation"))
    if not isinstance(name, str):
        raise TypeError(f"from_config takes the name of a config in model_configs, got {type(name).__name__}")
    hf_cfg = hf_config_from_name(name)
    dtype = _dtype_or_alias(dtype, torch_dtype)
    dtype = (as_dtype(getattr(hf_cfg, "dtype", None)) if dtype == "auto" else as_dtype(dtype)) or torch.float32
    check_dtype(dtype, _DTYPE_FIX)
    target = torch.get_default_device() if device is None else _target_device(device)
    if target.type == "meta":
        if any(processing.values()):
            raise ValueError("weight processing rewrites the weights, and a meta model has none: process after "
                             "loading weights (model.process_weights_(...))")
        with torch.device("meta"):
            model = HookedDecoder(family_for(hf_cfg).config_from_hf(hf_cfg), dtype=dtype)
        model.attn_implementation = resolve_attn_implementation(model.config, attn_implementation)
        model.tokenizer = char_tokenizer(model.config)
        model.name = name
        return _set_experts(model, experts_implementation)
    torch.manual_seed(seed)
    # an explicit device under a meta context: build for real (the context would make the HF model empty)
    with torch.device("cpu") if torch.get_default_device().type == "meta" else contextlib.nullcontext():
        implementation = resolve_attn_implementation(family_for(hf_cfg).config_from_hf(hf_cfg), attn_implementation)
        hf_model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation=implementation)
        model = from_hf_model(hf_model, dtype=dtype, device=device, share_weights=True,  # nobody else holds it
                              **processing)
    model.tokenizer = char_tokenizer(model.cfg)
    model.name = name
    return _set_experts(model, experts_implementation)


def _target_device(device) -> torch.device:
    from lens_det.devices import check_device

    return check_device(device)


def _build(hf_cfg: Any, hf_state_dict: dict, dtype: torch.dtype, device, copy: bool, source: str) -> HookedDecoder:
    target = _target_device(device or "cpu")
    family = family_for(hf_cfg)
    cfg = family.config_from_hf(hf_cfg)
    state = convert_state(family, hf_state_dict, cfg, source)
    empty = sorted(k for k, v in state.items() if v.is_meta)
    if empty:
        raise ValueError(f"the weights of {source} are on the meta device (no data: offloaded by accelerate, or built "
                         f"under init_empty_weights / torch.device('meta')), e.g. {empty[0]}; load lens_det from the "
                         "checkpoint instead: lens_det.from_pretrained(directory, device_map=...) "
                         "offloads the same way")
    if target.type == "meta":
        raise ValueError("device='meta' would drop the weights this call converts; for an empty model use "
                         "lens_det.from_config(name, device='meta'), or HookedDecoder(config) under "
                         "torch.device('meta')")
    with torch.device("meta"):
        model = HookedDecoder(cfg)
    state = {k: v.to(dtype, copy=copy) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"weight conversion mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(device=target).eval()
