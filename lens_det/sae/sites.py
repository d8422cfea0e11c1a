"""Where an SAE reads and writes: HF module paths to lens_det hooks, by what each hook computes, and hook widths.

Gemma Scope 2 names its hook points as HF module inputs and outputs ("model.layers.12.output",
"model.layers.12.pre_feedforward_layernorm.output"). `hook_for_hf_path` resolves them through the family's lens<->HF
module table (lens_det.hf.module_names): the HF module is found by the lens_det weight it holds, and the lens_det
hook is the one that carries that module's input or output (tests/sae/test_sites.py checks each against the HF
module's own tensor, bit for bit). Names alone mislead: TransformerLens 2.x's `hook_mlp_in` is the residual before
the pre-MLP norm, while a transcoder reads the norm's output, lens_det's `ln2.hook_normalized`.
"""

from __future__ import annotations

import re

from lens_det.config import LensConfig
from lens_det.hf import FAMILIES, module_names
from lens_det.hooks import hook_kind

# (lens_det weight of the HF module, "input" / "output") -> the lens_det hook (under blocks.{i}.) carrying it; the
# sandwich norms' outputs (Gemma 2-4) are what the residual adds, so the projections' outputs are hooks only without
LAYER_SITES = {
    ("ln1.w", "input"): "hook_resid_pre",
    ("ln1.w", "output"): "ln1.hook_normalized",
    ("ln2.w", "input"): "hook_resid_mid",
    ("ln2.w", "output"): "ln2.hook_normalized",
    ("ln1_post.w", "output"): "hook_attn_out",
    ("ln2_post.w", "output"): "hook_mlp_out",
    ("attn.w_o", "input"): "attn.hook_z",
    ("mlp.w_out", "input"): "mlp.hook_post",
}
UNNORMED_SITES = {("attn.w_o", "output"): "hook_attn_out", ("mlp.w_out", "output"): "hook_mlp_out"}
# hook_embed is the embedding LayerNorm's output where there is one (Bloom), else the (scaled) embedding's
MODEL_SITES = {("embed.ln.w", "output"): "hook_embed", ("ln_final.w", "output"): "ln_final.hook_normalized"}
UNNORMED_EMBED = {("embed.W_E", "output"): "hook_embed"}


def hook_for_hf_path(cfg: LensConfig, path: str) -> str:
    """The lens_det hook carrying an HF module's input or output: "model.layers.3.output" ->
    "blocks.3.hook_resid_post", "model.layers.3.pre_feedforward_layernorm.output" -> "blocks.3.ln2.hook_normalized",
    "model.layers.3.self_attn.o_proj.input" -> "blocks.3.attn.hook_z" (heads concatenated)."""
    family = FAMILIES[cfg.architecture]
    rest = path
    for prefix in family.DECODER_PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix):]
            break
    module, _, io = rest.rpartition(".")
    if io not in ("input", "output"):
        raise ValueError(f"HF hook point {path!r} must end in .input or .output")
    top, layer = module_names(cfg)
    match = re.fullmatch(rf"{family.LAYERS}\.(\d+)(?:\.(.+))?", module)
    if match:
        i, sub = int(match.group(1)), match.group(2)
        if i >= cfg.n_layers:
            raise ValueError(f"HF hook point {path!r} names layer {i}; the model has {cfg.n_layers}")
        if sub is None:
            return f"blocks.{i}.hook_resid_{'pre' if io == 'input' else 'post'}"
        sites = LAYER_SITES | ({} if cfg.post_attn_norm else UNNORMED_SITES)
        by_module = {(layer[w], where): hook for (w, where), hook in sites.items() if w in layer}
        if (sub, io) in by_module:
            return f"blocks.{i}.{by_module[sub, io]}"
        known = sorted(f"{family.LAYERS}.{{i}}.{m}.{where}" for m, where in by_module)
    else:
        sites = MODEL_SITES | ({} if cfg.embed_norm else UNNORMED_EMBED)
        by_module = {(top[w], where): hook for (w, where), hook in sites.items() if w in top}
        if (module, io) in by_module:
            return by_module[module, io]
        known = sorted(f"{m}.{where}" for m, where in by_module)
    raise ValueError(f"HF hook point {path!r} has no lens_det hook here; the {cfg.architecture} paths lens_det "
                     f"resolves are {family.LAYERS}.{{i}}[.input|.output] and {', '.join(known)}")


def hook_width(cfg: LensConfig, name: str) -> int:
    """The last-axis width an SAE at hook `name` reads (attn.hook_z: n_heads * d_head, its heads concatenated).
    Hooks of other layouts (scores, patterns, per-head q/k/v, per-slot experts) are refused."""
    kind = hook_kind(name)
    layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
    if kind.key == "blocks.attn.hook_z":
        return cfg.n_heads * cfg.layer_d_head(layer)
    if kind.layout[:2] != ("batch", "pos") or len(kind.layout) != 3:
        raise ValueError(f"an SAE is spliced at a [batch, pos, width] hook or at attn.hook_z, not at {name} "
                         f"(layout {kind.layout})")
    width = kind.layout[2]
    sizes = {"d_model": cfg.d_model, "d_ple": cfg.d_per_layer_input}
    if width == "d_mlp":
        return cfg.layer_d_mlp(layer)
    if width not in sizes:
        raise ValueError(f"an SAE cannot be spliced at {name} (its last axis is {width})")
    return sizes[width]
