"""Loading: from_pretrained (hub name, local directory or HF model object) and from_config (random weights)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lens_det.config import hf_config_from_name
from lens_det.convert import family_for
from lens_det.model import HookedDecoder
from lens_det.tokenizer import char_tokenizer

log = logging.getLogger(__name__)

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


LM_HEADS = ("ForCausalLM", "ForConditionalGeneration")  # HF classes whose head is the (tied) unembedding


def _process(model: HookedDecoder, steps: dict[str, bool]) -> HookedDecoder:
    """Apply TransformerLens weight processing chosen by keyword at load time (all off by default: HF-exact)."""
    from lens_det.weight_processing import STEPS

    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; weight-processing options are {', '.join(STEPS)}")
    if any(steps.values()):
        model.process_weights_(**{step: bool(steps.get(step, False)) for step in STEPS})
    return model


def from_hf_model(hf_model: Any, dtype: torch.dtype | str | None = None, device=None,
                  share_weights: bool = False, **processing: bool) -> HookedDecoder:
    """Convert an in-memory HF causal LM (e.g. BloomForCausalLM). dtype defaults to the HF model's.

    The lens_det model gets its own copy of the weights, so editing one model never changes the other (a parity
    report against the HF model then sees the edit). `share_weights=True` shares storage where dtype and layout
    allow (no copy; an in-place edit of either model then changes both).

    `processing`: TransformerLens's weight processing by keyword (fold_ln=True, center_writing_weights=True,
    center_unembed=True, fold_value_biases=True, refactor_factored_attn_matrices=True); all off by default, unlike
    TransformerLens, because a processed model is no longer HF-exact. See HookedDecoder.process_weights_.
    """
    from transformers import PreTrainedModel

    if not isinstance(hf_model, PreTrainedModel):
        raise TypeError(f"from_hf_model takes a transformers PreTrainedModel (e.g. GemmaForCausalLM), got "
                        f"{type(hf_model).__name__}; for a checkpoint name or directory use from_pretrained")
    _check_head(type(hf_model).__name__)
    dtype = _as_dtype(dtype) or next(hf_model.parameters()).dtype
    copy = not share_weights or any(processing.values())  # processing writes in place: never into the HF model
    model = _build(hf_model.config, hf_model.state_dict(), dtype, device, copy=copy, source=type(hf_model).__name__)
    if model.config.n_experts:
        model.experts_implementation = hf_experts_implementation(hf_model)
    return _process(model, processing)


def hf_experts_implementation(hf_model: Any) -> str:
    """The experts implementation an HF model runs (its text config's `_experts_implementation`; HF resolves
    None to "grouped_mm" when the model is built)."""
    from lens_det.components.moe import DEFAULT_EXPERTS_IMPLEMENTATION

    config = getattr(hf_model.config, "text_config", None) or hf_model.config
    return getattr(config, "_experts_implementation", None) or DEFAULT_EXPERTS_IMPLEMENTATION


def from_pretrained(
    name_or_path: str | Path | Any,
    dtype: torch.dtype = torch.float32,
    device=None,
    tokenizer: bool = True,
    experts_implementation: str | None = None,
    **processing: bool,
) -> HookedDecoder:
    """Load a checkpoint: an HF hub name (needs network or the local HF cache), a local `save_pretrained`
    directory, or an HF model object. Only the decoder (text) weights are read, straight from the weight files.

    Args:
        name_or_path: e.g. "bigscience/bloom-560m", "/path/to/dir", or a `PreTrainedModel`.
        dtype: the model dtype (weights are cast to it, as HF `from_pretrained(dtype=...)` does).
        device: where to put the model.
        tokenizer: attach the checkpoint's tokenizer when it has one.
        experts_implementation: MoE models: "grouped_mm" (HF's default, also when None) or "eager", to match an HF
            model loaded with the same `experts_implementation` (an HF model object brings its own).
        processing: TransformerLens weight processing by keyword (fold_ln=True, ...), off by default; see
            from_hf_model.
    """
    if not isinstance(name_or_path, (str, Path)):
        model = from_hf_model(name_or_path, dtype=dtype, device=device, **processing)
        return _set_experts(model, experts_implementation)
    directory = _local_dir(str(name_or_path))
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(directory)
    _check_head(*(getattr(hf_cfg, "architectures", None) or [None])[:1])
    model = _build(hf_cfg, _read_weights(directory), _as_dtype(dtype), device, copy=False, source=str(directory))
    model.name = str(name_or_path)
    if tokenizer:
        model.tokenizer = _load_tokenizer(directory)
    return _process(_set_experts(model, experts_implementation), processing)


def _set_experts(model: HookedDecoder, experts_implementation: str | None) -> HookedDecoder:
    if experts_implementation is not None:
        model.experts_implementation = experts_implementation  # validated there; refused without experts
    return model


def from_config(name: str, seed: int = 0, dtype=torch.float32, device=None, experts_implementation: str | None = None,
                **processing: bool) -> HookedDecoder:
    """A model with random weights for a named config (model_configs): an HF model of that config is
    initialised with `seed` and converted, so the result matches HF for the same seed. It carries an offline
    character tokenizer (lens_det.tokenizer), so string inputs work without a model hub. `experts_implementation`: see
    from_pretrained. `processing`: TransformerLens weight processing by keyword (fold_ln=True, ...), off by default;
    see from_hf_model."""
    from transformers import AutoModelForCausalLM

    if not isinstance(name, str):
        raise TypeError(f"from_config takes the name of a config in model_configs, got {type(name).__name__}")
    hf_cfg = hf_config_from_name(name)
    dtype = _as_dtype(dtype)
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="eager")
    model = from_hf_model(hf_model, dtype=dtype, device=device, share_weights=True,  # nobody else holds hf_model
                          **processing)
    model.tokenizer = char_tokenizer(model.cfg)
    model.name = name
    return _set_experts(model, experts_implementation)


def _as_dtype(dtype) -> torch.dtype | None:
    """torch.bfloat16 or "bfloat16" -> torch.bfloat16 (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. torch.bfloat16 or 'bfloat16'")
    return value


def _check_head(class_name: str | None) -> None:
    if class_name is not None and not class_name.endswith(LM_HEADS):
        raise ValueError(
            f"{class_name} is not a causal language model: lens_det converts *ForCausalLM models (and the text part "
            f"of *ForConditionalGeneration) and would silently drop this model's head. Load the causal-LM class of "
            f"the same checkpoint instead (e.g. {class_name.split('For')[0]}ForCausalLM)."
        )


def _build(hf_cfg: Any, hf_state_dict: dict, dtype: torch.dtype, device, copy: bool, source: str) -> HookedDecoder:
    family = family_for(hf_cfg)
    cfg = family.config_from_hf(hf_cfg)
    try:
        state = family.state_dict_from_hf(hf_state_dict, cfg)
    except KeyError as err:
        raise ValueError(f"the weights of {source} have no tensor {err.args[0]!r} (with or without the usual "
                         f"prefixes), which a {cfg.architecture} config with {cfg.n_layers} layers needs; the "
                         "checkpoint is incomplete or belongs to another config") from None
    with torch.device("meta"):
        model = HookedDecoder(cfg)
    state = {k: v.to(dtype, copy=copy) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"weight conversion mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(device=device or "cpu").eval()


def _local_dir(name: str) -> Path:
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


def _read_weights(directory: Path) -> dict:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state: dict = {}
        for f in files:
            state |= load_file(f)
        return state
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"no *.safetensors or pytorch_model*.bin weights in {directory}")
    state = {}
    for f in files:
        state |= torch.load(f, map_location="cpu", weights_only=True)
    return state


def _load_tokenizer(directory: Path):
    if not any((directory / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - a model without a usable tokenizer still runs on token ids
        log.warning("could not load the tokenizer in %s: %s", directory, err)
        return None
