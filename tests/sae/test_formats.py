"""load_sae on SAE folders written here by hand, following the layouts of lens_det.sae.formats' docstring (not with
save_sae), then save_sae -> load_sae round trips. Every tensor and config field is checked at 0.0: loading copies
(or transposes, or exponentiates: log_threshold, compared against the same torch.exp) and must change no bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lens_det
from lens_det.sae import SAE, SAEConfig, load_sae, save_sae

D_IN, D_SAE, D_OUT = 64, 48, 64  # tiny-gemma2's d_model; d_out of a transcoder at its MLP output


@pytest.fixture(scope="module")
def model():
    return lens_det.from_config("tiny-gemma2", seed=0)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def tensors(d_in=D_IN, d_sae=D_SAE, d_out=None, threshold=True, skip=False, dtype=torch.float32) -> dict:
    d_out = d_out or d_in
    out = {"W_enc": rand(d_in, d_sae, seed=1, dtype=dtype), "W_dec": rand(d_sae, d_out, seed=2, dtype=dtype),
           "b_enc": rand(d_sae, seed=3, dtype=dtype), "b_dec": rand(d_out, seed=4, dtype=dtype)}
    if threshold:
        out["threshold"] = rand(d_sae, seed=5, dtype=dtype).abs()
    if skip:
        out["W_skip"] = rand(d_in, d_out, seed=6, dtype=dtype)  # lens_det's orientation [d_in, d_out]
    return out


def assert_weights(sae: SAE, expected: dict) -> None:
    got = dict(sae.named_parameters())
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), name


def write_saelens(directory: Path, raw: dict, weights: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "sae_weights.safetensors"))
    return directory


# --- SAELens ---
@pytest.mark.parametrize("layout", ["metadata", "top_level"])
def test_saelens_jumprelu(tmp_path, layout):
    where = {"hook_name": "blocks.2.hook_resid_post", "model_name": "gemma-2-2b"}
    raw = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": False,
           "normalize_activations": "none"}
    raw |= {"metadata": where} if layout == "metadata" else where
    w = tensors()
    sae = load_sae(write_saelens(tmp_path / "sae", raw, w))
    assert_weights(sae, w)
    c = sae.cfg
    assert (c.d_in, c.d_sae, c.hook_name, c.architecture, c.model_name) == (
        D_IN, D_SAE, "blocks.2.hook_resid_post", "jumprelu", "gemma-2-2b")
    assert (c.hook_name_out, c.d_out, c.k, c.apply_b_dec_to_input, c.skip, c.input_scale) == (
        None, None, None, False, False, None)
    assert c.metadata == raw and not c.is_transcoder and "SAELens" in c.source


def test_saelens_metadata_wins_over_top_level(tmp_path):
    raw = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.0.hook_resid_post",
           "metadata": {"hook_name": "blocks.1.hook_resid_post"}}
    sae = load_sae(write_saelens(tmp_path, raw, tensors(threshold=False)))
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"


def test_saelens_log_threshold(tmp_path):
    w = tensors()
    stored = {k: v for k, v in w.items() if k != "threshold"} | {"log_threshold": rand(D_SAE, seed=9)}
    raw = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.0.hook_resid_post"}
    sae = load_sae(write_saelens(tmp_path, raw, stored))
    assert_weights(sae, {k: v for k, v in w.items() if k != "threshold"} | {"threshold": stored["log_threshold"].exp()})


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_saelens_standard_is_relu(tmp_path, apply_b_dec):
    raw = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.0.hook_resid_post",
           "apply_b_dec_to_input": apply_b_dec}
    w = tensors(threshold=False)
    sae = load_sae(write_saelens(tmp_path, raw, w))
    assert_weights(sae, w)
    assert sae.cfg.architecture == "relu" and sae.cfg.apply_b_dec_to_input is apply_b_dec


@pytest.mark.parametrize("raw_k", [{"architecture": "topk", "k": 5},
                                   {"architecture": "standard", "activation_fn_str": "topk",
                                    "activation_fn_kwargs": {"k": 5}}])
def test_saelens_topk(tmp_path, raw_k):
    raw = {"d_in": D_IN, "d_sae": D_SAE, "metadata": {"hook_name": "blocks.0.hook_resid_post"}} | raw_k
    w = tensors(threshold=False)
    sae = load_sae(write_saelens(tmp_path, raw, w))
    assert_weights(sae, w)
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", 5)


@pytest.mark.parametrize("arch,lens_arch,skip", [("transcoder", "relu", False), ("skip_transcoder", "relu", True),
                                                 ("jumprelu_transcoder", "jumprelu", False),
                                                 ("jumprelu_skip_transcoder", "jumprelu", True)])
def test_saelens_transcoders(tmp_path, arch, lens_arch, skip):
    """SAELens stores W_skip [d_out, d_in] (x @ W_skip.T): the loader transposes it to [d_in, d_out]."""
    d_out = 40
    raw = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "d_out": d_out,
           "metadata": {"hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out"}}
    w = tensors(d_out=d_out, threshold=lens_arch == "jumprelu", skip=skip)
    stored = dict(w)
    if skip:
        stored["W_skip"] = w["W_skip"].T.contiguous()
        assert stored["W_skip"].shape == (d_out, D_IN)
    sae = load_sae(write_saelens(tmp_path, raw, stored))
    assert_weights(sae, w)
    c = sae.cfg
    assert (c.architecture, c.skip, c.d_out, c.out_width, c.hook_name, c.hook_name_out, c.is_transcoder) == (
        lens_arch, skip, d_out, d_out, "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", True)


def test_saelens_dtype_kept_and_converted(tmp_path):
    raw = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.0.hook_resid_post"}
    w = tensors(dtype=torch.bfloat16)
    path = write_saelens(tmp_path, raw, w)
    assert_weights(load_sae(path), w)
    assert_weights(load_sae(path, dtype=torch.float32), {k: v.float() for k, v in w.items()})


def test_hook_name_override(tmp_path):
    raw = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.0.hook_resid_post"}
    sae = load_sae(write_saelens(tmp_path, raw, tensors()), hook_name="blocks.3.hook_resid_post")
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post"


# --- Gemma Scope 1 ---
def write_npz(directory: Path, weights: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "params.npz", **{k: v.numpy() for k, v in weights.items()})
    return directory


@pytest.mark.parametrize("suffix,hook_in,hook_out,d_in,d_out", [
    ("res", "blocks.3.hook_resid_post", None, 64, None),
    ("mlp", "blocks.3.hook_mlp_out", None, 64, None),
    ("att", "blocks.3.attn.hook_z", None, 64, None),
    ("transcoders", "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out", 64, 64),
])
def test_gemma_scope_1_sites(tmp_path, model, suffix, hook_in, hook_out, d_in, d_out):
    w = tensors(d_in=d_in, d_out=d_out)
    folder = write_npz(tmp_path / f"gemma-scope-2b-pt-{suffix}" / "layer_3" / "width_16k" / "average_l0_82", w)
    sae = load_sae(folder, model=model)
    assert_weights(sae, w)
    c = sae.cfg
    assert (c.hook_name, c.hook_name_out, c.d_out, c.architecture, c.input_scale, c.model_name) == (
        hook_in, hook_out, d_out, "jumprelu", None, "tiny-gemma2")
    assert (c.k, c.skip, c.apply_b_dec_to_input) == (None, False, False)
    model.add_sae(sae)  # the inferred site fits the model it names
    model.reset_saes()


def test_gemma_scope_1_sae_id_under_repo_folder(tmp_path, model):
    """load_sae(repo folder, sae_id): the site comes from the repo folder's name, the layer from sae_id."""
    w = tensors()
    write_npz(tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_82", w)
    sae = load_sae(tmp_path / "gemma-scope-2b-pt-res", "layer_1/width_16k/average_l0_82", model)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    assert_weights(sae, w)


def test_gemma_scope_1_embedding(tmp_path, model):
    w = tensors()
    folder = write_npz(tmp_path / "gemma-scope-2b-pt-embedding" / "width_4k" / "average_l0_6", w)
    sae = load_sae(folder, model=model)
    assert_weights(sae, w)
    assert sae.cfg.hook_name == "hook_embed" and sae.cfg.hook_name_out is None
    assert sae.cfg.input_scale == math.sqrt(model.config.d_model) == 8.0
    with pytest.raises(ValueError, match=r"pass d_model= \(or model=\)"):
        load_sae(folder)


def test_gemma_scope_1_site_and_hook_name_arguments(tmp_path):
    folder = write_npz(tmp_path / "anywhere" / "layer_2", tensors())
    with pytest.raises(ValueError, match="cannot tell which Gemma Scope site"):
        load_sae(folder)
    assert load_sae(folder, site="mlp").cfg.hook_name == "blocks.2.hook_mlp_out"
    assert load_sae(folder, hook_name="blocks.0.hook_resid_pre").cfg.hook_name == "blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="site='resid' is no Gemma Scope site"):
        load_sae(folder, site="resid")
    with pytest.raises(ValueError, match="no layer_L folder"):
        load_sae(write_npz(tmp_path / "gemma-scope-2b-pt-res" / "w", tensors()))


# --- Gemma Scope 2 ---
def write_gemma_scope_2(directory: Path, raw: dict, weights: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    names = {"W_enc": "w_enc", "W_dec": "w_dec", "W_skip": "affine_skip_connection"}
    save_file({names.get(k, k): v.contiguous() for k, v in weights.items()}, str(directory / "params.safetensors"))
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


def test_gemma_scope_2_sae(tmp_path, model):
    raw = {"hf_hook_point_in": "model.layers.2.output", "hf_hook_point_out": "model.layers.2.output",
           "architecture": "jump_relu", "type": "sae", "affine_connection": False, "model_name": "gemma-3-1b-pt",
           "width": D_SAE}
    w = tensors()
    sae = load_sae(write_gemma_scope_2(tmp_path, raw, w), model=model)
    assert_weights(sae, w)
    c = sae.cfg
    assert (c.hook_name, c.hook_name_out, c.d_in, c.d_sae, c.d_out, c.architecture, c.skip, c.model_name) == (
        "blocks.2.hook_resid_post", None, D_IN, D_SAE, D_IN, "jumprelu", False, "gemma-3-1b-pt")
    assert c.metadata == raw and not c.is_transcoder


@pytest.mark.parametrize("skip", [False, True])
def test_gemma_scope_2_transcoder(tmp_path, model, skip):
    """affine_skip_connection is stored [d_in, d_out], as lens_det holds it: no transpose."""
    raw = {"hf_hook_point_in": "model.layers.1.pre_feedforward_layernorm.output",
           "hf_hook_point_out": "model.layers.1.post_feedforward_layernorm.output", "architecture": "jump_relu",
           "type": "transcoder", "affine_connection": skip}
    w = tensors(skip=skip)
    sae = load_sae(write_gemma_scope_2(tmp_path, raw, w), model=model)
    assert_weights(sae, w)
    c = sae.cfg
    assert (c.hook_name, c.hook_name_out, c.skip, c.is_transcoder) == (
        "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", skip, True)


def test_gemma_scope_2_needs_model(tmp_path):
    raw = {"hf_hook_point_in": "model.layers.2.output", "type": "sae"}
    with pytest.raises(ValueError, match="pass model= to load_sae"):
        load_sae(write_gemma_scope_2(tmp_path, raw, tensors()))


# --- save_sae -> load_sae ---
def random_sae(cfg: SAEConfig, seed=0, dtype=torch.float32) -> SAE:
    sae = SAE(cfg, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(dtype))
    return sae


def assert_same(loaded: SAE, sae: SAE, fields=("d_in", "d_sae", "architecture", "k", "skip", "hook_name",
                                                "out_hook", "out_width", "model_name", "apply_b_dec_to_input")):
    for name, p in sae.named_parameters():
        assert torch.equal(getattr(loaded, name), p), name
    assert sorted(n for n, _ in loaded.named_parameters()) == sorted(n for n, _ in sae.named_parameters())
    for f in fields:
        assert getattr(loaded.cfg, f) == getattr(sae.cfg, f), f


SAELENS_CASES = [
    {"architecture": "relu"}, {"architecture": "relu", "apply_b_dec_to_input": True},
    {"architecture": "jumprelu"}, {"architecture": "topk", "k": 3},
    {"architecture": "relu", "hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out",
     "d_out": 40},
    {"architecture": "relu", "hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.1.hook_mlp_out",
     "d_out": 40, "skip": True},
    {"architecture": "jumprelu", "hook_name": "blocks.1.ln2.hook_normalized",
     "hook_name_out": "blocks.1.hook_mlp_out", "d_out": 40},
    {"architecture": "jumprelu", "hook_name": "blocks.1.ln2.hook_normalized",
     "hook_name_out": "blocks.1.hook_mlp_out", "d_out": 40, "skip": True},
]


def base_cfg(**kw) -> SAEConfig:
    return SAEConfig(**({"d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.1.hook_resid_post",
                         "model_name": "tiny-gemma2"} | kw))


@pytest.mark.parametrize("kw", SAELENS_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_saelens(tmp_path, kw, dtype):
    sae = random_sae(base_cfg(**kw), dtype=dtype)
    loaded = load_sae(save_sae(sae, tmp_path / "sae", "saelens"))
    assert_same(loaded, sae)
    assert loaded.dtype == dtype


@pytest.mark.parametrize("hook_name,hook_out", [("blocks.1.hook_resid_post", None),
                                                ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")])
def test_round_trip_gemma_scope_1(tmp_path, model, hook_name, hook_out):
    """Gemma Scope 1 files hold only the weights (always JumpReLU, float32): the site comes from the folder."""
    suffix = "transcoders" if hook_out else "res"
    sae = random_sae(base_cfg(architecture="jumprelu", hook_name=hook_name, hook_name_out=hook_out,
                              d_out=D_IN if hook_out else None))
    folder = tmp_path / f"gemma-scope-2b-pt-{suffix}" / "layer_1" / "width_16k" / "average_l0_10"
    loaded = load_sae(save_sae(sae, folder, "gemma_scope_1"), model=model)
    assert_same(loaded, sae)


GS2_CASES = [
    ({"architecture": "jumprelu"}, "model.layers.1.output", None),
    ({"architecture": "relu"}, "model.layers.1.output", None),
    ({"architecture": "topk", "k": 3}, "model.layers.1.output", None),
    ({"architecture": "jumprelu", "hook_name": "blocks.1.ln2.hook_normalized",
      "hook_name_out": "blocks.1.hook_mlp_out", "d_out": D_IN}, "model.layers.1.pre_feedforward_layernorm.output",
     "model.layers.1.post_feedforward_layernorm.output"),
    ({"architecture": "jumprelu", "hook_name": "blocks.1.ln2.hook_normalized",
      "hook_name_out": "blocks.1.hook_mlp_out", "d_out": D_IN, "skip": True},
     "model.layers.1.pre_feedforward_layernorm.output", "model.layers.1.post_feedforward_layernorm.output"),
]


@pytest.mark.parametrize("kw,hf_in,hf_out", GS2_CASES, ids=["jumprelu", "relu", "topk", "transcoder", "skip"])
def test_round_trip_gemma_scope_2(tmp_path, model, kw, hf_in, hf_out):
    meta = {"hf_hook_point_in": hf_in} | ({"hf_hook_point_out": hf_out} if hf_out else {})
    sae = random_sae(base_cfg(**kw, metadata=meta))
    loaded = load_sae(save_sae(sae, tmp_path / "sae", "gemma_scope_2"), model=model)
    assert_same(loaded, sae)


def test_save_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="fmt must be 'saelens', 'gemma_scope_1' or 'gemma_scope_2', got 'npz'"):
        save_sae(random_sae(base_cfg()), tmp_path, "npz")


# --- hub ---
def test_hub_unreachable_raises(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def offline(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise ConnectionError("offline (test)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"'some/repo' is not a local directory and could not be fetched from the "
                                         r"hub \(offline \(test\)\)"):
        load_sae("some/repo", "x")
    assert calls == [("some/repo", {"allow_patterns": ["x/*"]})]


def test_hub_download_loads(tmp_path, monkeypatch):
    import huggingface_hub

    raw = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.0.hook_resid_post"}
    w = tensors()
    write_saelens(tmp_path / "snapshot" / "x", raw, w)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path / "snapshot"))
    monkeypatch.chdir(tmp_path)
    assert_weights(load_sae("some/repo", "x"), w)


# --- what a format cannot hold must not be dropped silently (save_sae refuses, or the loaded SAE is the same) ---
@pytest.mark.parametrize("fmt,kw", [
    ("gemma_scope_2", {"architecture": "relu", "apply_b_dec_to_input": True}),
    ("saelens", {"architecture": "jumprelu", "hook_name": "hook_embed", "input_scale": 8.0}),
], ids=["gs2_apply_b_dec", "saelens_input_scale"])
def test_save_refuses_or_keeps_semantics(tmp_path, model, fmt, kw):
    sae = random_sae(base_cfg(**kw, metadata={"hf_hook_point_in": "model.layers.1.output"}))
    try:
        folder = save_sae(sae, tmp_path / "sae", fmt)
    except ValueError:
        return
    loaded = load_sae(folder, model=model)
    x = rand(2, 3, D_IN, seed=7)
    assert (loaded.cfg.apply_b_dec_to_input, loaded.cfg.input_scale) == (sae.cfg.apply_b_dec_to_input,
                                                                         sae.cfg.input_scale)
    assert torch.equal(loaded(x), sae(x))
