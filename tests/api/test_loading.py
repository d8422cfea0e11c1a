"""Loading: save_pretrained -> from_pretrained(dir) equals conversion from memory; named configs."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3Config, Gemma3ForConditionalGeneration

import lens_det
from lens_det.config import LensConfig, hf_config_from_name, named_configs
from lens_det.hf.random_models import random_hf_model
from tests.helpers import batch

REAL = ["bloom-560m", "bloom-1b1", "bloom-1b7", "bloom-3b", "bloom-7b1", "bloom", "bloomz-560m", "gemma-2b",
        "gemma-7b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "gemma-3-270m", "gemma-3-1b", "gemma-3-4b",
        "gemma-3-12b", "gemma-3-27b", "gemma-4-31b", "gemma-4-12b", "gemma-4-26b-a4b", "vaultgemma-1b",
        "gemma-4-e2b", "gemma-4-e4b"]


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma2", "tiny-gemma3", "tiny-vaultgemma", "tiny-gemma4",
                                  "tiny-gemma4-ple", "tiny-gemma4-moe", "tiny-gemma3n"])
def test_save_pretrained_round_trip(tmp_path, name, dtype):
    hf = random_hf_model(name)
    hf.save_pretrained(tmp_path)
    from_dir = lens_det.from_pretrained(tmp_path, dtype=dtype)
    from_memory = lens_det.from_hf_model(random_hf_model(name, dtype))
    assert_same_model(from_dir, from_memory)
    assert from_dir.cfg.dtype == dtype
    tokens, mask = batch("left", from_dir.cfg.d_vocab)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)  # HF's defaults: sdpa where supported
    assert from_dir.attn_implementation == reference.config._attn_implementation  # the defaults agree
    with torch.no_grad():
        assert torch.equal(from_dir(tokens, attention_mask=mask),
                           reference(tokens, attention_mask=mask, use_cache=False).logits)


def test_gemma3_conditional_generation_text_part(tmp_path):
    """A saved multimodal Gemma 3 loads as its text decoder; that class never applies the final soft-cap."""
    text = hf_config_from_name("tiny-gemma3").to_dict()
    cfg = Gemma3Config(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=2, image_size=28, patch_size=14), mm_tokens_per_image=4)
    torch.manual_seed(0)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    hf.save_pretrained(tmp_path)
    model = lens_det.from_pretrained(tmp_path)
    assert model.cfg.final_softcap is None and model.cfg.hf_architecture == "Gemma3ForConditionalGeneration"
    tokens, mask = batch("left", model.cfg.d_vocab)
    reference = Gemma3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = reference(input_ids=tokens, attention_mask=mask, use_cache=False).logits
        assert torch.equal(model(tokens, attention_mask=mask), ref)
    assert_same_model(model, lens_det.from_hf_model(hf))


def test_attn_implementation_at_load_time(tmp_path):
    """from_pretrained / from_config take attn_implementation (default: HF's pick for the family), refuse sdpa for
    the eager-only families before reading any weight, and the runtime switch changes the logits to HF's."""
    random_hf_model("tiny-gemma3").save_pretrained(tmp_path / "g3")
    random_hf_model("tiny-gemma2").save_pretrained(tmp_path / "g2")
    tokens, mask = batch("left", 128)
    for implementation in ("eager", "sdpa"):
        model = lens_det.from_pretrained(tmp_path / "g3", attn_implementation=implementation)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "g3", dtype=torch.float32,
                                                  attn_implementation=implementation)
        with torch.no_grad():
            assert torch.equal(model(tokens, attention_mask=mask), hf(tokens, attention_mask=mask,
                                                                      use_cache=False).logits)
        assert lens_det.from_config("tiny-gemma3", attn_implementation=implementation).attn_implementation == \
            implementation
    assert lens_det.from_pretrained(tmp_path / "g2").attn_implementation == "eager"
    assert lens_det.from_config("tiny-gemma3").attn_implementation == "sdpa"
    for call in (lambda: lens_det.from_pretrained(tmp_path / "g2", attn_implementation="sdpa"),
                 lambda: lens_det.from_config("tiny-bloom", attn_implementation="sdpa")):
        with pytest.raises(ValueError, match="'sdpa' is not available for this model.*eager-only|eager attention only"):
            call()
    with pytest.raises(ValueError, match="must be one of.*flash_attention_2"):
        lens_det.from_pretrained(tmp_path / "g3", attn_implementation="flash_attention_2")
    hf = random_hf_model("tiny-gemma3")
    hf.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match="flex_attention.*does not implement"):
        lens_det.from_hf_model(hf)


@pytest.mark.parametrize("name", REAL)
def test_real_checkpoint_configs(name):
    """Every named checkpoint config resolves to the shapes recorded in its JSON record (hf_config)."""
    record = named_configs()[name]
    hf = record["hf_config"]
    cfg = LensConfig.from_name(name)
    assert LensConfig.from_name(record["hf_name"]) == cfg
    assert record["sources"], "a named config must say where its values come from"
    assert cfg.d_model == hf.get("hidden_size", hf.get("n_embed"))
    assert cfg.n_layers == hf.get("num_hidden_layers", hf.get("n_layer"))
    assert cfg.d_vocab == hf.get("vocab_size", 262144)  # Gemma 4's converter leaves the default, 262144
    if cfg.positional == "rope":
        hf_cfg = hf_config_from_name(name)  # head_dim / kv heads may be class defaults, absent from the record
        read = getattr(hf_cfg, "_getattr_without_heterogeneous_validation", lambda k: getattr(hf_cfg, k))
        assert cfg.d_head == read("head_dim") and cfg.n_key_value_heads == read("num_key_value_heads")
    if name.startswith(("gemma-4-", "vaultgemma")):
        assert cfg.final_softcap == 30.0 and cfg.hf_architecture == hf["architectures"][0]
    if name in ("gemma-4-31b", "gemma-4-12b"):  # full layers: 512-dim heads, fewer kv heads, K = V
        full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
        assert full == [i for i in range(cfg.n_layers) if (i + 1) % 6 == 0]
        assert {cfg.layer_d_head(i) for i in full} == {512} and all(cfg.layer_k_eq_v(i) for i in full)
        assert {cfg.layer_n_key_value_heads(i) for i in full} == {hf["num_global_key_value_heads"]}
    if name in ("gemma-4-e2b", "gemma-4-e4b"):  # per-layer embeddings 256 wide; the last N layers share K/V
        n_shared = hf["num_kv_shared_layers"]
        assert cfg.d_per_layer_input == hf["hidden_size_per_layer_input"] == 256
        first = cfg.n_layers - n_shared
        assert all(cfg.layer_kv_source(i) is None for i in range(first))
        for t in ("sliding_attention", "full_attention"):  # each consumer reads the last earlier layer of its type
            source = max(i for i in range(first) if cfg.layer_types[i] == t)
            assert {cfg.layer_kv_source(i) for i in range(first, cfg.n_layers) if cfg.layer_types[i] == t} == {source}
        wide = 2 if hf.get("use_double_wide_mlp") else 1
        assert [cfg.layer_d_mlp(i) for i in range(cfg.n_layers)] == \
            [hf["intermediate_size"] * (wide if i >= first else 1) for i in range(cfg.n_layers)]
    if name.startswith("gemma-2-"):
        assert cfg.layer_types[0] == "sliding_attention" and cfg.attn_scale == hf["query_pre_attn_scalar"] ** -0.5
    if name == "gemma-4-26b-a4b":  # 128 experts, top-8, beside the dense MLP
        assert (cfg.n_experts, cfg.n_experts_per_token, cfg.d_mlp_expert, cfg.d_mlp) == (128, 8, 704, 2112)
    if name.startswith("gemma-3-"):
        assert [t == "full_attention" for t in cfg.layer_types] == [(i + 1) % 6 == 0 for i in range(cfg.n_layers)]


def test_named_configs_ship_in_the_installed_package(tmp_path):
    """Imported from outside the checkout, the installed lens_det carries every model_configs/*.json."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from importlib import resources; import json; d = resources.files('lens_det.model_configs'); "
            "print(json.dumps(sorted(p.name for p in d.iterdir() if p.name.endswith('.json'))))")
    shipped = json.loads(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                        check=True).stdout)
    checkout = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "model_configs").glob("*.json"))
    assert shipped == checkout and len(shipped) == len(named_configs()) >= len(REAL)


def test_from_config_matches_hf_with_the_same_seed():
    model = lens_det.from_config("tiny-gemma2", seed=3)
    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(hf_config_from_name("tiny-gemma2"), attn_implementation="eager").eval()
    tokens, _ = batch("none", model.cfg.d_vocab)
    with torch.no_grad():
        assert torch.equal(model(tokens), hf(tokens, use_cache=False).logits)


def test_unknown_config_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model config 'bloom-9000'.*known names"):
        LensConfig.from_name("bloom-9000")
    with pytest.raises(ValueError, match="local directory"):
        lens_det.from_pretrained("/nonexistent/dir/for/lens_det")


def test_tokenizer_from_the_checkpoint_dir_left_pads(tmp_path):
    """A saved tokenizer is attached; to_tokens returns tokens and mask, left-padded by default."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "the", "cat", "sat", "on", "mat"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    random_hf_model("tiny-bloom").save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = lens_det.from_pretrained(tmp_path)
    tokens, mask = model.to_tokens(["the cat sat on the mat", "the cat"])
    assert tokens.tolist() == [[4, 5, 6, 7, 4, 8], [3, 3, 3, 3, 4, 5]]
    assert mask.tolist() == [[1] * 6, [0, 0, 0, 0, 1, 1]]
    right, _ = model.to_tokens(["the cat sat", "cat"], padding_side="right")
    assert right.tolist() == [[4, 5, 6], [5, 3, 3]]
    assert model.to_string(tokens[1, 4:]) == "the cat"
    assert model.to_single_token("mat") == 8
    with torch.no_grad():  # the padded row equals the prompt alone at its real tokens (ALiBi from the mask)
        padded = model(tokens, attention_mask=mask)
        alone = model(tokens[1:, 4:])
    torch.testing.assert_close(padded[1, 4:], alone[0], rtol=0, atol=1e-5)  # fp32 row-count rounding only


def test_pyproject_installs_every_subpackage_and_the_configs():
    """pyproject.toml lists packages explicitly (to map model_configs/ into lens_det): a new subpackage must be
    added there, or a non-editable install silently lacks it."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "lens_det").rglob("__init__.py")}
    assert found | {"lens_det.model_configs"} == listed


# --- issue 19: checkpoint errors that say what to check ---

def _saved_gemma2(tmp_path):
    random_hf_model("tiny-gemma2").save_pretrained(tmp_path)
    return tmp_path


def _edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


@pytest.mark.parametrize("fields, key, named", [
    ({"intermediate_size": 112}, r"model\.layers\.0\.mlp\.gate_proj\.weight", r"intermediate_size \(112\)"),
    ({"num_key_value_heads": 1}, r"model\.layers\.0\.self_attn\.k_proj\.weight",
     r"num_key_value_heads x head_dim \(1 x 16\)"),
])
def test_a_checkpoint_tensor_of_another_shape_names_the_key_and_the_config_field(tmp_path, fields, key, named):
    """config.json that does not describe the weights: the message names the checkpoint tensor, its shape, the
    shape the config gives, and the config.json field(s) that give the differing size."""
    directory = _saved_gemma2(tmp_path)
    _edit_config(directory, **fields)
    with pytest.raises(ValueError, match=rf"checkpoint tensor '{key}' has shape .* config\.json .*{named}"):
        lens_det.from_pretrained(directory)


def test_a_truncated_checkpoint_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = _saved_gemma2(tmp_path)
    state = load_file(directory / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:90].clone()
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(90, 64\).*"
                                         r"\(96, 64\).*intermediate_size \(96\)"):
        lens_det.from_pretrained(directory)


def test_a_directory_without_weights_says_what_a_checkpoint_needs(tmp_path):
    directory = _saved_gemma2(tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no weight files.*model\.safetensors.*model\.safetensors\.index\.json.*"
                                         r"pytorch_model\.bin"):
        lens_det.from_pretrained(directory)


def test_a_float64_checkpoint_is_refused_at_load_with_the_supported_dtypes(tmp_path):
    """HF's own float64 models give NaN on left-padded rows (their softmax runs in float32) and the MoE's
    grouped_mm has no float64 kernel, so there is no reference to match: refused at load, the float32 default
    and an explicit dtype still load the same weights."""
    hf = random_hf_model("tiny-gemma2", torch.float64)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"float64.*torch\.float32.*torch\.bfloat16.*torch\.float16"):
        lens_det.from_pretrained(tmp_path, dtype="auto")
    with pytest.raises(ValueError, match=r"float64.*dtype=torch\.float32"):
        lens_det.from_hf_model(hf)
    model = lens_det.from_pretrained(tmp_path)  # the default float32 reads the float64 weights rounded
    assert model.cfg.dtype == torch.float32
    assert torch.equal(model.embed.W_E, hf.model.embed_tokens.weight.float())
