"""Reading and writing SAEs in the three formats Gemma SAEs are published in.

- **SAELens** (a directory with `cfg.json` + `sae_weights.safetensors`): `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_out]`,
  `b_enc`, `b_dec`, `threshold` (jumprelu; older files store `log_threshold`), `W_skip [d_out, d_in]` (skip
  transcoders). cfg.json's `architecture` ("standard", "jumprelu", "topk", "transcoder", "skip_transcoder",
  "jumprelu_transcoder", "jumprelu_skip_transcoder"), `d_in`, `d_sae`, `d_out`, `k`, `apply_b_dec_to_input`,
  `normalize_activations`, `reshape_activations`, and `hook_name` / `model_name` at the top level or under
  `metadata` (SAELens 6).
- **Gemma Scope 1** (`params.npz` in `layer_L/width_W/average_l0_X` of a repo such as google/gemma-scope-2b-pt-res):
  `W_enc`, `W_dec`, `b_enc`, `b_dec`, `threshold`, all JumpReLU. The file does not say where it reads: the repo's
  suffix does (-res, -mlp, -att, -transcoders, -embedding), taken from the path or from `site=`.
- **Gemma Scope 2** (`params.safetensors` + `config.json`): `w_enc`, `w_dec`, `b_enc`, `b_dec`, `threshold`, optional
  `affine_skip_connection [d_in, d_out]`; config.json's `hf_hook_point_in` / `hf_hook_point_out` (HF module paths,
  lens_det.sae.sites), `architecture`, `type` ("sae", "transcoder"; "clt", cross-layer transcoders, is refused),
  `affine_connection`, `model_name`.

`load_sae(path_or_repo, sae_id=None, model=None, ...)` reads a local directory, or downloads `sae_id`'s folder of a
hub repo with huggingface_hub when the path is not a directory. Tensors keep their stored dtype unless `dtype=` is
given. A missing or unexpected tensor, a shape that disagrees with the config, an unknown architecture or a mixed
dtype raises before anything is built.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from lens_det.sae.sae import SAE, SAEConfig

SAELENS_ARCHITECTURES = {  # SAELens architecture -> (lens_det architecture, transcoder, skip)
    "standard": ("relu", False, False), "relu": ("relu", False, False), "jumprelu": ("jumprelu", False, False),
    "topk": ("topk", False, False), "transcoder": ("relu", True, False), "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False), "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
GEMMA_SCOPE_1_SITES = {  # repo suffix -> (input hook, output hook) under blocks.{L}. (embedding: model level)
    "res": ("hook_resid_post", None), "mlp": ("hook_mlp_out", None), "att": ("attn.hook_z", None),
    "transcoders": ("ln2.hook_normalized", "hook_mlp_out"), "embedding": ("hook_embed", None),
}
GEMMA_SCOPE_2_ARCHITECTURES = {"jump_relu": "jumprelu", "jumprelu": "jumprelu", "relu": "relu", "topk": "topk"}


def _tensors(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path) as npz:
            tensors = {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
    else:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    floating = {k: v for k, v in tensors.items() if v.is_floating_point()}
    dtypes = {v.dtype for v in floating.values()}
    if dtype is None and len(dtypes) > 1:
        stored = ", ".join(f"{k}: {v.dtype}" for k, v in floating.items())
        raise ValueError(f"{path} stores tensors of several dtypes ({stored}): pass dtype=torch.float32 (or the dtype "
                         "you want) to load_sae")
    return {k: v.to(dtype) if dtype is not None else v for k, v in tensors.items()}


def _build(cfg: SAEConfig, tensors: dict[str, torch.Tensor], names: dict[str, str], device) -> SAE:
    """An SAE from file tensors; `names` maps lens_det weight -> the file's key. Every expected tensor must be there
    with the config's shape, and nothing else."""
    probe = SAE(cfg, device="meta")
    expected = {name: tuple(p.shape) for name, p in probe.named_parameters()}
    keys = {names.get(name, name): name for name in expected}
    missing = sorted(k for k in keys if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in keys)
    if missing or unexpected:
        raise ValueError(f"{cfg.source}: missing tensors {missing}, unexpected tensors {unexpected} for a "
                         f"{cfg.architecture} {'transcoder' if cfg.is_transcoder else 'SAE'}"
                         f"{' with skip' if cfg.skip else ''} (d_in={cfg.d_in}, d_sae={cfg.d_sae})")
    for key, name in keys.items():
        if tuple(tensors[key].shape) != expected[name]:
            raise ValueError(f"{cfg.source}: tensor {key} has shape {tuple(tensors[key].shape)}, the config says "
                             f"{expected[name]}")
    dtype = tensors[next(iter(keys))].dtype
    sae = SAE(cfg, dtype=dtype, device=device)
    with torch.no_grad():
        for key, name in keys.items():
            getattr(sae, name).copy_(tensors[key])
    return sae


def load_saelens(directory: str | Path, dtype=None, device=None) -> SAE:
    directory = Path(directory)
    raw = json.loads((directory / "cfg.json").read_text())
    meta = raw.get("metadata") or {}
    arch_name = raw.get("architecture", "standard")
    if arch_name not in SAELENS_ARCHITECTURES:
        raise ValueError(f"{directory}: SAELens architecture {arch_name!r} is not implemented (implemented: "
                         f"{', '.join(SAELENS_ARCHITECTURES)})")
    architecture, transcoder, skip = SAELENS_ARCHITECTURES[arch_name]
    if raw.get("activation_fn_str", raw.get("activation_fn")) == "topk" and architecture == "relu":
        architecture = "topk"  # SAELens 5: a standard SAE with a topk activation
    normalize = raw.get("normalize_activations") or "none"
    if normalize != "none":
        raise NotImplementedError(f"{directory}: normalize_activations={normalize!r} is not implemented (it needs the "
                                  "dataset's norm scaling factor); fold it into the weights first")
    hook = meta.get("hook_name", raw.get("hook_name"))
    if not hook:
        raise ValueError(f"{directory}/cfg.json names no hook_name (top level or under metadata)")
    hook_out = meta.get("hook_name_out", raw.get("hook_name_out")) if transcoder else None
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
    cfg = SAEConfig(d_in=raw["d_in"], d_sae=raw["d_sae"], hook_name=hook, architecture=architecture,
                    hook_name_out=hook_out, d_out=raw.get("d_out") if transcoder else None, k=k, skip=skip,
                    apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", False)),
                    input_scale=meta.get("input_scale"), model_name=meta.get("model_name", raw.get("model_name")),
                    source=f"SAELens directory {directory}", metadata=raw)
    tensors = _tensors(directory / "sae_weights.safetensors", dtype)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()  # SAELens: [d_out, d_in], x @ W_skip.T
    return _build(cfg, tensors, {}, device)


def _gemma_scope_1_site(directory: Path, site: str | None) -> tuple[str, int | None]:
    layer = next((int(m.group(1)) for part in reversed(directory.parts) if (m := re.fullmatch(r"layer_(\d+)", part))),
                 None)
    if site is None:
        found = [s for part in directory.parts for s in GEMMA_SCOPE_1_SITES if re.search(rf"gemma-scope.*-{s}\b", part)]
        if len(set(found)) != 1:
            raise ValueError(f"{directory}: cannot tell which Gemma Scope site this is from its path; pass "
                             f"site= one of {', '.join(GEMMA_SCOPE_1_SITES)} (the repo's suffix) or hook_name=")
        site = found[0]
    if site not in GEMMA_SCOPE_1_SITES:
        raise ValueError(f"site={site!r} is no Gemma Scope site ({', '.join(GEMMA_SCOPE_1_SITES)})")
    return site, layer


def load_gemma_scope_1(directory: str | Path, site: str | None = None, hook_name: str | None = None,
                       model_name: str | None = None, d_model: int | None = None, dtype=None, device=None) -> SAE:
    """A Gemma Scope (1) JumpReLU SAE or transcoder from its params.npz folder. The embedding SAE reads hook_embed
    / sqrt(d_model) (pass d_model, or load it through load_sae with the model)."""
    directory = Path(directory)
    tensors = _tensors(directory / "params.npz", dtype)
    hook_out = None
    scale = None
    if hook_name is None:
        site, layer = _gemma_scope_1_site(directory, site)
        into, out = GEMMA_SCOPE_1_SITES[site]
        if site == "embedding":
            hook_name = into
            if d_model is None:
                raise ValueError("a Gemma Scope embedding SAE reads hook_embed / sqrt(d_model): pass d_model= "
                                 "(or model=)")
            scale = math.sqrt(d_model)
        else:
            if layer is None:
                raise ValueError(f"{directory}: no layer_L folder in the path; pass hook_name=")
            hook_name, hook_out = f"blocks.{layer}.{into}", out and f"blocks.{layer}.{out}"
    w_enc = tensors.get("W_enc")
    if w_enc is None or w_enc.ndim != 2:
        raise ValueError(f"{directory}/params.npz: missing tensors ['W_enc'] (has {sorted(tensors)})")
    d_out = tensors["W_dec"].shape[-1] if "W_dec" in tensors else None
    cfg = SAEConfig(d_in=w_enc.shape[0], d_sae=w_enc.shape[1], hook_name=hook_name, architecture="jumprelu",
                    hook_name_out=hook_out, d_out=d_out if hook_out else None, input_scale=scale,
                    model_name=model_name, source=f"Gemma Scope directory {directory}")
    return _build(cfg, tensors, {}, device)


def load_gemma_scope_2(directory: str | Path, model_cfg=None, dtype=None, device=None) -> SAE:
    """A Gemma Scope 2 SAE or transcoder from its params.safetensors + config.json folder. Its HF hook points are
    resolved on `model_cfg` (a LensConfig; lens_det.sae.sites.hook_for_hf_path)."""
    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    kind = raw.get("type", "sae")
    if kind not in ("sae", "transcoder"):
        raise NotImplementedError(f"{directory}: Gemma Scope 2 type {kind!r} is not implemented (implemented: sae, "
                                  "transcoder; cross-layer transcoders write every later layer, which one splice "
                                  "site per SAE cannot express)")
    arch = raw.get("architecture", "jump_relu")
    if arch not in GEMMA_SCOPE_2_ARCHITECTURES:
        raise ValueError(f"{directory}: Gemma Scope 2 architecture {arch!r} is not implemented (implemented: "
                         f"{', '.join(GEMMA_SCOPE_2_ARCHITECTURES)})")
    if model_cfg is None:
        raise ValueError("a Gemma Scope 2 SAE names its hook points as HF module paths: pass model= to load_sae "
                         "so they resolve to the model's hooks")
    from lens_det.sae.sites import hook_for_hf_path

    hook_in = hook_for_hf_path(model_cfg, raw["hf_hook_point_in"])
    hook_out = hook_for_hf_path(model_cfg, raw.get("hf_hook_point_out") or raw["hf_hook_point_in"])
    tensors = _tensors(directory / "params.safetensors", dtype)
    if "w_enc" not in tensors or "w_dec" not in tensors:
        raise ValueError(f"{directory}/params.safetensors: missing tensors "
                         f"{sorted({'w_enc', 'w_dec'} - set(tensors))} (has {sorted(tensors)})")
    skip = bool(raw.get("affine_connection", "affine_skip_connection" in tensors))
    cfg = SAEConfig(d_in=tensors["w_enc"].shape[0], d_sae=tensors["w_enc"].shape[1], hook_name=hook_in,
                    architecture=GEMMA_SCOPE_2_ARCHITECTURES[arch],
                    hook_name_out=hook_out if hook_out != hook_in else None, d_out=tensors["w_dec"].shape[-1],
                    k=raw.get("k"), skip=skip, model_name=raw.get("model_name"),
                    source=f"Gemma Scope 2 directory {directory}", metadata=raw)
    names = {"W_enc": "w_enc", "W_dec": "w_dec", "W_skip": "affine_skip_connection"}
    return _build(cfg, tensors, names, device)


def detect_format(directory: Path) -> str:
    if (directory / "cfg.json").exists() and (directory / "sae_weights.safetensors").exists():
        return "saelens"
    if (directory / "params.npz").exists():
        return "gemma_scope_1"
    if (directory / "params.safetensors").exists() and (directory / "config.json").exists():
        return "gemma_scope_2"
    raise ValueError(f"{directory} holds no SAE lens_det reads: expected cfg.json + sae_weights.safetensors "
                     "(SAELens), params.npz (Gemma Scope), or params.safetensors + config.json (Gemma Scope 2); "
                     f"found {sorted(p.name for p in directory.iterdir())[:10]}")


def _download(repo_id: str, sae_id: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo_id, allow_patterns=[f"{sae_id}/*"] if sae_id else None)
    except Exception as error:  # offline, unknown repo, gated
        raise ValueError(f"{repo_id!r} is not a local directory and could not be fetched from the hub ({error}); "
                         "pass the path of a downloaded SAE folder") from error
    return Path(root) / sae_id if sae_id else Path(root)


def load_sae(path_or_repo: str | Path, sae_id: str | None = None, model: Any = None, *, site: str | None = None,
             hook_name: str | None = None, dtype: torch.dtype | None = None, device=None) -> SAE:
    """An SAE from a local directory in any of the three formats, or from `sae_id`'s folder of a hub repo
    (e.g. load_sae("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82", model)). `model` (a
    HookedDecoder) resolves Gemma Scope 2's HF hook paths and the embedding SAE's scale, and sets the device
    (default: its embedding's); the SAE is not attached: model.add_sae(sae) does that and checks it fits."""
    path = Path(path_or_repo)
    directory = (path / sae_id if sae_id else path) if path.is_dir() else _download(str(path_or_repo), sae_id)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    if device is None and model is not None:
        device = model.embed.W_E.device if model.embed.W_E.device.type != "meta" else None
    fmt = detect_format(directory)
    if fmt == "saelens":
        sae = load_saelens(directory, dtype, device)
    elif fmt == "gemma_scope_1":
        sae = load_gemma_scope_1(directory, site, hook_name, getattr(model, "name", None) if model else None,
                                 model.config.d_model if model is not None else None, dtype, device)
    else:
        sae = load_gemma_scope_2(directory, model.config if model is not None else None, dtype, device)
    if hook_name is not None and fmt != "gemma_scope_1":
        sae.cfg.hook_name = hook_name
    return sae


def save_sae(sae: SAE, directory: str | Path, fmt: str = "saelens") -> Path:
    """Write an SAE in one of the formats above ("saelens", "gemma_scope_1", "gemma_scope_2"); Gemma Scope 2 needs
    HF hook paths, taken from `sae.cfg.metadata["hf_hook_point_in"/"_out"]`. What a format cannot hold is refused
    (Gemma Scope 1: JumpReLU only, stored as float32 like the release; Gemma Scope 2: no apply_b_dec_to_input or
    input scale); SAELens' cfg.json carries an embedding SAE's input scale under metadata.input_scale."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    weights = {name: p.detach().cpu().contiguous() for name, p in sae.named_parameters()}
    from safetensors.torch import save_file

    if fmt == "saelens":
        if "W_skip" in weights:
            weights["W_skip"] = weights["W_skip"].T.contiguous()
        names = {v: k for k, v in SAELENS_ARCHITECTURES.items() if k != "standard"}
        arch = names.get((cfg.architecture, cfg.is_transcoder, cfg.skip))
        if arch is None:
            raise ValueError(f"SAELens has no architecture for a {cfg.architecture} "
                             f"{'transcoder' if cfg.is_transcoder else 'SAE'}{' with skip' if cfg.skip else ''}")
        raw = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
               "dtype": str(sae.dtype).removeprefix("torch."),
               "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "hook_z" if cfg.hook_name.endswith("hook_z") else "none",
               "metadata": {"hook_name": cfg.hook_name, "model_name": cfg.model_name}}
        if cfg.input_scale is not None:  # not SAELens' own field: lens_det reads it back (Gemma Scope's embedding)
            raw["metadata"]["input_scale"] = cfg.input_scale
        if cfg.k is not None:
            raw["k"] = cfg.k
        if cfg.is_transcoder:
            raw |= {"d_out": cfg.out_width}
            raw["metadata"]["hook_name_out"] = cfg.out_hook
        (directory / "cfg.json").write_text(json.dumps(raw, indent=2))
        save_file(weights, str(directory / "sae_weights.safetensors"))
    elif fmt == "gemma_scope_1":
        if cfg.architecture != "jumprelu" or cfg.skip or cfg.apply_b_dec_to_input:
            raise ValueError("Gemma Scope 1's format holds JumpReLU SAEs without skip or apply_b_dec_to_input; "
                             "save this one as 'saelens'")
        import numpy as np

        np.savez(directory / "params.npz", **{k: v.float().numpy() for k, v in weights.items()})
    elif fmt == "gemma_scope_2":
        if cfg.apply_b_dec_to_input or cfg.input_scale is not None:
            raise ValueError("Gemma Scope 2's format has no apply_b_dec_to_input or input scale; save this one as "
                             "'saelens'")
        names = {"W_enc": "w_enc", "W_dec": "w_dec", "W_skip": "affine_skip_connection"}
        save_file({names.get(k, k): v for k, v in weights.items()}, str(directory / "params.safetensors"))
        raw = {"hf_hook_point_in": cfg.metadata["hf_hook_point_in"],
               "hf_hook_point_out": cfg.metadata.get("hf_hook_point_out", cfg.metadata["hf_hook_point_in"]),
               "architecture": "jump_relu" if cfg.architecture == "jumprelu" else cfg.architecture,
               "type": "transcoder" if cfg.is_transcoder else "sae", "affine_connection": cfg.skip,
               "model_name": cfg.model_name, "width": cfg.d_sae}
        if cfg.k is not None:
            raw["k"] = cfg.k
        (directory / "config.json").write_text(json.dumps(raw, indent=2))
    else:
        raise ValueError(f"fmt must be 'saelens', 'gemma_scope_1' or 'gemma_scope_2', got {fmt!r}")
    return directory
