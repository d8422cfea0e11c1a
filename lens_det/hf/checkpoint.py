"""Reading an HF checkpoint directory: where it is (a local directory, or the hub), its weights (lazily, one tensor
at a time), its tokenizer, its dtype (HF's dtype="auto"), and the checks made before any weight is read (a causal-LM
class, tensor shapes against config.json). lens_det.loading builds models from these.
"""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

LM_HEADS = ("ForCausalLM", "ForConditionalGeneration")  # HF classes whose head is the (tied) unembedding


def check_causal_lm_head(class_name: str | None, model_type: str | None) -> None:
    """Refuse an HF class without the causal-LM head, naming the class to load instead: transformers' causal-LM
    class of the config's model_type (Gemma3TextModel, model_type gemma3_text -> Gemma3ForCausalLM)."""
    if class_name is not None and not class_name.endswith(LM_HEADS):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "its *ForCausalLM class")
        raise ValueError(
            f"{class_name} is not a causal language model: lens_det converts *ForCausalLM models (and the text part "
            f"of *ForConditionalGeneration) and would silently drop this model's head. Load the causal-LM class of "
            f"the same checkpoint instead ({causal}; transformers.AutoModelForCausalLM picks it)."
        )


def local_dir(name: str) -> Path:
    """`name` as a local directory, else the hub snapshot of that repo id (config, tokenizer and weight files only;
    pytorch_model*.bin only when there are no safetensors); ValueError saying what to pass when neither works."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
        path = Path(snapshot_download(name, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # older repos ship only pytorch_model*.bin
            path = Path(snapshot_download(name, allow_patterns=[*patterns, "pytorch_model*.bin"]))
        return path
    except Exception as err:  # noqa: BLE001 - re-raised with what to do
        raise ValueError(
            f"could not find {name!r} as a local directory or download it from the HF hub ({err}); "
            "pass a directory written by save_pretrained, or an HF model object"
        ) from err


def load_tokenizer(directory: Path):
    """The directory's tokenizer (transformers.AutoTokenizer), or None when it has none or it cannot be loaded."""
    if not any((directory / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - a model without a usable tokenizer still runs on token ids
        log.warning("could not load the tokenizer in %s: %s", directory, err)
        return None


def as_dtype(dtype) -> torch.dtype | None:
    """torch.bfloat16 or "bfloat16" -> torch.bfloat16 (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. torch.bfloat16, 'bfloat16' or 'auto' (the "
                         "checkpoint's dtype)")
    return value


def checkpoint_dtype(hf_cfg: Any, checkpoint: Checkpoint) -> torch.dtype:
    """What HF 5's from_pretrained(dtype="auto") loads: config.dtype (config.json's "dtype", or the legacy
    "torch_dtype"), else a sharded index's metadata dtype, else the first floating-point tensor of the first
    weight file (else its first tensor's dtype; float32 for an empty file). HF's _get_dtype."""
    value = getattr(hf_cfg, "dtype", None)
    if value is not None:
        return as_dtype(value)
    if checkpoint.index_dtype is not None:
        return as_dtype(checkpoint.index_dtype)
    first = [t for k, t in checkpoint.meta.items() if checkpoint.where[k] == checkpoint.files[0]]
    floats = [t.dtype for t in first if t.is_floating_point() and "float8_" not in str(t.dtype)
              and "float4_" not in str(t.dtype)]
    return floats[0] if floats else (first[0].dtype if first else torch.float32)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


class Checkpoint:
    """A directory's weight files, read lazily: `meta` holds every tensor as a meta tensor (shape and dtype from the
    safetensors headers), `load(key, device, dtype)` reads one tensor straight onto `device`. pytorch_model*.bin
    files are memory-mapped (torch.load(mmap=True)), so only what is loaded is read."""

    def __init__(self, directory: Path):
        import json

        self.files = sorted(directory.glob("*.safetensors"))
        self.safetensors = bool(self.files)
        self.where: dict[str, Path] = {}
        self.meta: dict[str, torch.Tensor] = {}
        self._handles: dict = {}
        self._tensors: dict[str, torch.Tensor] = {}
        index = directory / "model.safetensors.index.json"
        self.index_dtype = json.loads(index.read_text()).get("metadata", {}).get("dtype") if index.exists() else None
        if self.safetensors:
            from safetensors import safe_open

            for file in self.files:
                with safe_open(file, framework="pt") as handle:
                    for key in handle.keys():
                        piece = handle.get_slice(key)
                        self.where[key] = file
                        self.meta[key] = torch.empty(piece.get_shape(), device="meta",
                                                     dtype=_SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.uint8))
            return
        self.files = sorted(directory.glob("pytorch_model*.bin"))
        if not self.files:
            raise ValueError(f"no weight files in {directory}: a checkpoint directory holds config.json and the "
                             "weights save_pretrained writes, model.safetensors (or its shards "
                             "model-00001-of-0000N.safetensors with model.safetensors.index.json) or pytorch_model.bin "
                             "(or its shards with pytorch_model.bin.index.json); copy or download them there")
        for file in self.files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
            for key, tensor in state.items():
                self.where[key], self._tensors[key] = file, tensor
                self.meta[key] = torch.empty_like(tensor, device="meta")

    def load(self, key: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if not self.safetensors:  # a copy: the model must not hold the read-only file mapping
            return self._tensors[key].to(device=device, dtype=dtype, copy=True)
        from safetensors import safe_open

        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        where = str(device)
        handle, owned = self._handles.get((self.where[key], where), (None, True))
        if handle is None:
            # CPU tensors are read into memory the tensor owns (pread): a tensor served from the file mapping of a
            # still-open handle made every matmul on it ~100x slower here
            try:
                handle = safe_open(self.where[key], framework="pt", device=where,
                                   **({"backend": "pread"} if where == "cpu" else {}))
            except TypeError:  # safetensors before the backend option: copy out of the mapping
                handle, owned = safe_open(self.where[key], framework="pt", device=where), where != "cpu"
            self._handles[(self.where[key], where)] = (handle, owned)
        tensor = handle.get_tensor(key)
        return tensor.to(dtype) if tensor.dtype != dtype or owned else tensor.clone()

    def close(self) -> None:
        self._handles.clear()
        self._tensors.clear()


def convert_state(family, hf_state_dict: dict, cfg, source: str) -> dict:
    """`family.state_dict_from_hf`, with a missing tensor reported as a ValueError naming it and the checkpoint."""
    try:
        return family.state_dict_from_hf(hf_state_dict, cfg)
    except KeyError as err:
        raise ValueError(f"the weights of {source} have no tensor {err.args[0]!r} (with or without the usual "
                         f"prefixes), which a {cfg.architecture} config with {cfg.n_layers} layers needs; the "
                         "checkpoint is incomplete or belongs to another config") from None


def lazy_conversion(family, checkpoint: Checkpoint, cfg, source: str) -> dict[str, str | torch.Tensor]:
    """lens_det key -> the checkpoint key it is read from. The converters rename tensors, so running one on the meta
    tensors and matching its outputs back by identity says which; should a converter ever compute a tensor, that
    conversion runs on the real tensors instead (and its values are returned)."""
    state = convert_state(family, checkpoint.meta, cfg, source)
    by_id = {id(t): k for k, t in checkpoint.meta.items()}
    sources = {key: by_id.get(id(value)) for key, value in state.items()}
    if all(sources.values()):
        return sources
    real = {k: checkpoint.load(k, torch.device("cpu"), t.dtype) for k, t in checkpoint.meta.items()}
    return dict(family.state_dict_from_hf(real, cfg))


_SHAPE_FIELD = re.compile(r"(size|dim|heads?|experts|_input)$")  # config.json fields that size weights


def _shape_fields(hf_cfg: Any) -> dict[str, int]:
    text = getattr(hf_cfg, "text_config", None) or hf_cfg
    return {k: v for k, v in text.to_dict().items() if _SHAPE_FIELD.search(k) and type(v) is int}


def _fields_giving(fields: dict[str, int], size: int) -> list[str]:
    """The shape fields equal to `size`, and the products of two that are ("head_dim (16)",
    "num_key_value_heads x head_dim (1 x 16)")."""
    return ([f"{k} ({v})" for k, v in fields.items() if v == size]
            + [f"{a} x {b} ({fields[a]} x {fields[b]})" for a, b in itertools.combinations(fields, 2)
               if fields[a] * fields[b] == size])


def check_shapes(model: nn.Module, checkpoint: Checkpoint, sources: dict, hf_cfg: Any) -> None:
    """Every checkpoint tensor has the shape config.json gives its lens_det weight, checked before anything is read;
    a mismatch names the checkpoint key and the config fields that give the differing size."""
    expected, fields = model.state_dict(), _shape_fields(hf_cfg)
    for key, source in sources.items():
        got = checkpoint.meta[source].shape if isinstance(source, str) else source.shape
        if key not in expected or got == expected[key].shape:
            continue
        want = expected[key].shape
        sizes = [w for g, w in zip(got, want) if g != w] if len(got) == len(want) else []
        giving = [f for size in sizes for f in _fields_giving(fields, size)]
        check = " or ".join(giving) or "shape fields (" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"
        what = f"checkpoint tensor {source!r}" if isinstance(source, str) else f"the tensor converted to {key}"
        raise ValueError(f"{what} has shape {tuple(got)}, but config.json gives {tuple(want)} for lens_det's {key}: "
                         f"the two disagree. Check config.json's {check} against the checkpoint; if config.json is "
                         "right, the weight file is damaged or belongs to another model")
