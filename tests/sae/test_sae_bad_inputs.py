"""Every bad SAE input gets a clear error and leaves the model as it was: its hook names, its attached SAEs and its
logits (torch.equal: the same forward on the same weights) are identical before and after the failed call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lens_det
from lens_det.sae import SAE, SAEConfig, load_sae

D = 64  # tiny-gemma2's d_model
TOKENS = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    m = lens_det.from_config("tiny-gemma2", seed=0)
    m.reset_saes()
    return m


def state(model):
    with torch.no_grad():
        logits = model(TOKENS)
    return sorted(model.hook_dict), dict(model.acts_to_saes), logits


def assert_unchanged(model, before):
    hooks, saes, logits = state(model)
    assert hooks == before[0]
    assert saes.keys() == before[1].keys() and all(saes[k] is before[1][k] for k in saes)
    assert torch.equal(logits, before[2])


@pytest.fixture(scope="module")
def attached(model):
    """One SAE attached (a failed add_sae must not detach it) and the model's state with it, computed once."""
    sae = sae_at("blocks.0.hook_resid_post")
    model.reset_saes()
    model.add_sae(sae, use_error_term=True)
    return sae, state(model)


@pytest.fixture
def fresh(model, attached):
    """The model with `attached`'s SAE, as it was; after the test its hooks and SAEs are checked again."""
    sae, before = attached
    model.reset_saes()
    model.add_sae(sae, use_error_term=True)
    yield model, before
    assert sorted(model.hook_dict) == before[0] and model.acts_to_saes == before[1]
    model.reset_saes()


def sae_at(hook, d_in=D, d_out=None, hook_out=None, model_name=None, arch="relu"):
    sae = SAE(SAEConfig(d_in=d_in, d_sae=16, hook_name=hook, hook_name_out=hook_out, d_out=d_out,
                        architecture=arch, model_name=model_name))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return sae


@pytest.mark.parametrize("sae,message", [
    (lambda: sae_at("blocks.1.hook_resid_post", d_in=32),
     r"the SAE's input width is 32, but blocks.1.hook_resid_post is 64 wide on this model \(d_in must match"),
    (lambda: sae_at("blocks.1.ln2.hook_normalized", d_out=40, hook_out="blocks.1.hook_mlp_out"),
     r"the SAE's output width is 40, but blocks.1.hook_mlp_out is 64 wide on this model \(d_out must match"),
    (lambda: sae_at("blocks.1.mlp.hook_post", d_in=D),
     r"the SAE's input width is 64, but blocks.1.mlp.hook_post is 96 wide"),
    (lambda: sae_at("blocks.1.hook_resid_pots"),
     r"the SAE's input hook 'blocks.1.hook_resid_pots' is no hook point of this model \(did you mean "
     r"blocks.1.hook_resid_post"),
    (lambda: sae_at("blocks.1.ln2.hook_normalized", hook_out="blocks.9.hook_mlp_out"),
     r"the SAE's output hook 'blocks.9.hook_mlp_out' is no hook point"),
    (lambda: sae_at("blocks.0.hook_resid_post.hook_sae_input"), r"is no hook point of this model"),
    (lambda: sae_at("blocks.0.hook_attn_in"),
     r"the SAE's input hook blocks.0.hook_attn_in does not fire with the current settings; call "
     r"model.set_use_attn_in\(True\)"),
    (lambda: sae_at("blocks.2.ln2.hook_normalized", hook_out="blocks.1.hook_mlp_out"),
     r"a transcoder writes after it reads: blocks.1.hook_mlp_out runs before blocks.2.ln2.hook_normalized"),
    (lambda: sae_at("blocks.1.attn.hook_pattern"), r"an SAE is spliced at a \[batch, pos, width\] hook"),
    (lambda: sae_at("blocks.1.hook_resid_post", model_name="google/gemma-2-2b"),
     r"this SAE was trained on 'google/gemma-2-2b', the model is 'tiny-gemma2': .* pass check_model=False"),
])
def test_add_sae_refuses(fresh, sae, message):
    model, before = fresh
    with pytest.raises(ValueError, match=message):
        model.add_sae(sae())
    assert_unchanged(model, before)


def test_add_sae_not_an_sae(fresh):
    with pytest.raises(TypeError, match="add_sae takes a lens_det.sae.SAE"):
        fresh[0].add_sae(torch.nn.Linear(64, 64))


def test_saes_block_refusal_restores(fresh):
    """A bad SAE inside `with model.saes([...])`: the good one before it is detached again, the old one stays."""
    model, before = fresh
    good, bad = sae_at("blocks.2.hook_resid_post"), sae_at("blocks.2.hook_mlp_out", d_in=3)
    with pytest.raises(ValueError, match="input width is 3"):
        with model.saes([good, bad]):
            pass
    assert_unchanged(model, before)


def test_check_model_false_splices(model):
    model.reset_saes()
    before = state(model)
    sae = sae_at("blocks.1.hook_resid_post", model_name="gemma-2-2b")
    assert model.add_sae(sae, check_model=False) is sae
    assert model.acts_to_saes == {"blocks.1.hook_resid_post": sae}
    with torch.no_grad():
        assert not torch.equal(model(TOKENS), before[2])  # the reconstruction flows on
    model.reset_saes()
    assert_unchanged(model, before)


def test_model_name_org_and_case_ignored(model):
    model.reset_saes()
    model.add_sae(sae_at("blocks.1.hook_resid_post", model_name="someorg/Tiny-Gemma2"))
    model.reset_saes()


def test_remove_unknown(fresh):
    with pytest.raises(ValueError, match=r"no SAE is attached at blocks.3.hook_resid_post; attached: "
                                         r"\['blocks.0.hook_resid_post'\]"):
        fresh[0].remove_sae("blocks.3.hook_resid_post")


# --- files ---
def weights(d_in=D, d_sae=16, threshold=True):
    gen = torch.Generator().manual_seed(0)
    out = {"W_enc": torch.randn(d_in, d_sae, generator=gen), "W_dec": torch.randn(d_sae, d_in, generator=gen),
           "b_enc": torch.randn(d_sae, generator=gen), "b_dec": torch.randn(d_in, generator=gen)}
    return out | ({"threshold": torch.rand(d_sae, generator=gen)} if threshold else {})


def saelens_dir(path: Path, raw_extra=None, tensors=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    raw = {"architecture": "jumprelu", "d_in": D, "d_sae": 16, "hook_name": "blocks.1.hook_resid_post"}
    (path / "cfg.json").write_text(json.dumps(raw | (raw_extra or {})))
    save_file(weights() if tensors is None else tensors, str(path / "sae_weights.safetensors"))
    return path


def gs2_dir(path: Path, raw_extra=None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    w = weights()
    save_file({"w_enc": w["W_enc"], "w_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"],
               "threshold": w["threshold"]}, str(path / "params.safetensors"))
    raw = {"hf_hook_point_in": "model.layers.1.output", "type": "sae", "architecture": "jump_relu"}
    (path / "config.json").write_text(json.dumps(raw | (raw_extra or {})))
    return path


W = weights()
FILE_CASES = {
    "unknown_architecture": (lambda p: saelens_dir(p, {"architecture": "gated"}), ValueError,
                             r"SAELens architecture 'gated' is not implemented \(implemented: standard"),
    "missing_tensor": (lambda p: saelens_dir(p, tensors={k: v for k, v in W.items() if k != "threshold"}),
                       ValueError, r"missing tensors \['threshold'\], unexpected tensors \[\] for a jumprelu SAE"),
    "unexpected_tensor": (lambda p: saelens_dir(p, tensors=W | {"W_skip": torch.zeros(D, D)}), ValueError,
                          r"missing tensors \[\], unexpected tensors \['W_skip'\]"),
    "wrong_shape": (lambda p: saelens_dir(p, tensors=W | {"b_enc": torch.zeros(17)}), ValueError,
                    r"tensor b_enc has shape \(17,\), the config says \(16,\)"),
    "mixed_dtypes": (lambda p: saelens_dir(p, tensors=W | {"b_enc": W["b_enc"].bfloat16()}), ValueError,
                     r"stores tensors of several dtypes .*b_enc: torch.bfloat16.*: pass dtype=torch.float32"),
    "topk_without_k": (lambda p: saelens_dir(p, {"architecture": "topk"}, weights(threshold=False)), ValueError,
                       r"a topk SAE needs an integer k"),
    "no_hook_name": (lambda p: saelens_dir(p, {"hook_name": None}), ValueError, r"names no hook_name"),
    "normalize_activations": (lambda p: saelens_dir(p, {"normalize_activations": "expected_average_only_in"}),
                              NotImplementedError, r"normalize_activations='expected_average_only_in' is not "
                                                   r"implemented"),
    "gs2_clt": (lambda p: gs2_dir(p, {"type": "clt"}), NotImplementedError,
                r"Gemma Scope 2 type 'clt' is not implemented \(implemented: sae, transcoder; cross-layer"),
    "gs2_unknown_architecture": (lambda p: gs2_dir(p, {"architecture": "batchtopk"}), ValueError,
                                 r"Gemma Scope 2 architecture 'batchtopk' is not implemented"),
    "gs2_unknown_hf_path": (lambda p: gs2_dir(p, {"hf_hook_point_in": "model.layers.1.mlp.gate_proj.output"}),
                            ValueError, r"has no lens_det hook here"),
    "no_sae_files": (lambda p: (p.mkdir(), (p / "README.md").write_text("x"), p)[-1], ValueError,
                     r"holds no SAE lens_det reads: .*found \['README.md'\]"),
    "not_a_directory": (lambda p: p / "absent" / "x", ValueError, r"could not be fetched|is not a directory"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_load_refuses(fresh, tmp_path, monkeypatch, case):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("offline (test)")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    model, before = fresh
    make, error, message = FILE_CASES[case]
    path = make(tmp_path / "sae")
    with pytest.raises(error, match=message):
        load_sae(path, model=model)
    assert_unchanged(model, before)


def test_mixed_dtypes_with_dtype_loads(tmp_path):
    path = saelens_dir(tmp_path / "sae", tensors=W | {"b_enc": W["b_enc"].bfloat16()})
    sae = load_sae(path, dtype=torch.float32)
    assert sae.dtype == torch.float32 and torch.equal(sae.b_enc, W["b_enc"].bfloat16().float())
