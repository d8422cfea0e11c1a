"""HF loading conventions: dtype="auto" / torch_dtype, device_map (accelerate: auto maps, CPU and disk offload),
transformers keywords lens_det does not take, meta-device construction, and placements that would lose weights."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lens_det
from lens_det.config import hf_config_from_name
from lens_det.devices import resolve_device_map
from lens_det.parity.models import random_hf_model_from_config
from lens_det.hf.random_models import random_hf_model
from tests.helpers import batch

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> a save_pretrained directory (float32 tiny-gemma3 / tiny-bloom, bfloat16 tiny-gemma3, and an untied
    tiny-gemma3, which has an lm_head to offload)."""
    dirs = {}

    def get(name: str):
        if name not in dirs:
            path = tmp_path_factory.mktemp(name)
            if name == "untied":
                cfg = hf_config_from_name("tiny-gemma3")
                cfg.tie_word_embeddings = False
                random_hf_model_from_config(cfg).save_pretrained(path)
            elif name.endswith("-bf16"):
                random_hf_model(name.removesuffix("-bf16"), torch.bfloat16).save_pretrained(path)
            else:
                random_hf_model(name).save_pretrained(path)
            dirs[name] = path
        return dirs[name]

    return get


def logits(model):
    tokens, mask = batch("left", model.cfg.d_vocab, length=10)
    with torch.no_grad():
        return model(tokens, attention_mask=mask)


def hf_logits(hf):
    tokens, mask = batch("left", hf.config.get_text_config().vocab_size, length=10)
    with torch.no_grad():
        return hf(tokens, attention_mask=mask, use_cache=False).logits


def assert_same_weights(model, other):
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# --- 1. dtype="auto" and torch_dtype ---

def test_dtype_auto_is_the_checkpoints_dtype_and_the_default_stays_float32(saved, tmp_path):
    directory = saved("tiny-gemma3-bf16")
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
    model = lens_det.from_pretrained(directory, dtype="auto")
    assert model.cfg.dtype == hf.dtype == torch.bfloat16
    assert_same_weights(model, lens_det.from_hf_model(hf))
    assert torch.equal(logits(model), hf_logits(hf))
    assert lens_det.from_pretrained(directory).cfg.dtype == torch.float32  # TransformerLens's default, kept
    # no dtype in config.json: HF 5 (and lens_det) fall back to the dtype of the stored tensors
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert lens_det.from_pretrained(tmp_path, dtype="auto").cfg.dtype == hf.dtype == torch.bfloat16
    assert lens_det.from_config("tiny-gemma3", dtype="auto").cfg.dtype == torch.float32  # the config names none


def test_torch_dtype_is_an_alias_of_dtype(saved):
    directory = saved("tiny-gemma3")
    via_alias = lens_det.from_pretrained(directory, torch_dtype=torch.bfloat16)
    assert_same_weights(via_alias, lens_det.from_pretrained(directory, dtype=torch.bfloat16))
    assert lens_det.from_config("tiny-gemma3", torch_dtype="bfloat16").cfg.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="pass dtype or torch_dtype .*not both"):
        lens_det.from_pretrained(directory, dtype=torch.float32, torch_dtype=torch.bfloat16)


# --- 2. device_map through accelerate ---

@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-bloom", "tiny-gemma3n"])
def test_device_map_auto_equals_hf_with_the_same_arguments(saved, name):
    directory = saved(name)
    model = lens_det.from_pretrained(directory, dtype="auto", device_map="auto")
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", device_map="auto")
    assert_same_weights(model, lens_det.from_hf_model(hf))
    assert torch.equal(logits(model), hf_logits(hf))
    assert_same_weights(lens_det.from_pretrained(directory, dtype="auto", low_cpu_mem_usage=False), model)
    if NO_CUDA:  # "auto" without a GPU: everything on the CPU, as accelerate resolves it
        assert {t.device.type for t in model.state_dict().values()} == {"cpu"}


def _half_cpu_half_disk(n_layers: int) -> dict:
    return {"embed": "cpu", **{f"blocks.{i}": "cpu" if i < n_layers // 2 else "disk" for i in range(n_layers)},
            "ln_final": "disk"}


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma3n"])  # 3n: the streams' projections live with embed
def test_cpu_and_disk_offload_equal_the_plain_model_bitwise(saved, tmp_path, name):
    directory = saved(name)
    plain = lens_det.from_pretrained(directory)
    n = plain.cfg.n_layers
    model = lens_det.from_pretrained(directory, device_map=_half_cpu_half_disk(n), offload_folder=tmp_path / "off",
                                     low_cpu_mem_usage=True)
    for i, block in enumerate(model.blocks):
        assert block.attn.w_q.is_meta == (i >= n // 2) and hasattr(block.attn, "_hf_hook") == (i >= n // 2)
        assert not block.ln1.w.is_meta  # the norm the forward routes activations by stays resident
    assert torch.equal(logits(model), logits(plain))  # same weights, same CPU ops: tolerance 0
    assert model.blocks[-1].attn.w_q.is_meta  # loaded for the forward only
    assert not (tmp_path / "off").exists()  # safetensors: the disk weights are read from the checkpoint itself
    # a KV-cache forward, twice: the same logits and cache as the plain model's
    tokens, mask = batch("left", plain.cfg.d_vocab, length=12)
    runs = []
    for m in (plain, model):
        cache = m.new_cache()
        with torch.no_grad():
            first = m(tokens[:, :8], attention_mask=mask[:, :8], kv_cache=cache)
            second = m(tokens[:, 8:], attention_mask=mask, kv_cache=cache)
        runs.append((first, second, cache))
    (a1, a2, plain_cache), (b1, b2, cache) = runs
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    for ours, theirs in zip(cache.layers, plain_cache.layers):
        if theirs.keys is None:  # a KV-sharing consumer layer stores nothing (Gemma 3n's last layers)
            assert ours.keys is None
            continue
        assert ours.keys.device.type == "cpu" and torch.equal(ours.keys, theirs.keys)
        assert torch.equal(ours.values, theirs.values)
    # every hook point fires inside the offloaded modules, with the same values
    _, expected = plain.run_with_cache(tokens, attention_mask=mask)
    _, got = model.run_with_cache(tokens, attention_mask=mask)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected.keys())
    with pytest.raises(ValueError, match="weight processing .* offloaded"):
        lens_det.from_pretrained(directory, device_map=_half_cpu_half_disk(n), fold_ln=True)


def test_hf_named_map_offloads_an_untied_unembedding_to_disk(saved):
    """The map in HF module names, lm_head on disk (an untied model), matches HF with the same map."""
    directory = saved("untied")
    cfg = json.loads((directory / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)},
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    model = lens_det.from_pretrained(directory, device_map=device_map)
    assert model.unembed.weight.is_meta and hasattr(model.unembed, "_hf_hook")
    hf = AutoModelForCausalLM.from_pretrained(directory, device_map=device_map)
    plain = lens_det.from_pretrained(directory)
    assert torch.equal(logits(model), logits(plain))
    assert torch.equal(logits(model), hf_logits(hf))
    with pytest.raises(ValueError, match="weights of .* are on the meta device .*offloaded by accelerate"):
        lens_det.from_hf_model(hf)  # its lm_head is on meta: converting it would lose that weight


def test_disk_offload_of_a_bin_checkpoint_writes_to_offload_folder(saved, tmp_path):
    """pytorch_model.bin cannot be read per tensor at forward time: disk parts are written to offload_folder
    (accelerate's offload_weight), and without one the error says to pass it."""
    source = saved("tiny-gemma3")
    hf = AutoModelForCausalLM.from_pretrained(source)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    plain = lens_det.from_pretrained(source)
    device_map = _half_cpu_half_disk(plain.cfg.n_layers)
    model = lens_det.from_pretrained(tmp_path, device_map=device_map, offload_folder=tmp_path / "off")
    assert any(p.suffix == ".dat" and p.name.startswith(f"blocks.{plain.cfg.n_layers - 1}.")
               for p in (tmp_path / "off").iterdir())
    assert torch.equal(logits(model), logits(plain))
    with pytest.raises(ValueError, match="not safetensors.*offload_folder="):
        lens_det.from_pretrained(tmp_path, device_map=device_map)


def test_auto_map_with_max_memory_offloads_the_tail_to_disk(saved):
    directory = saved("tiny-gemma3")
    plain = lens_det.from_pretrained(directory)
    model = lens_det.from_pretrained(directory, device_map="auto", max_memory={"cpu": 300_000})
    offloaded = [i for i, b in enumerate(model.blocks) if b.attn.w_q.is_meta]
    assert 0 < len(offloaded) < plain.cfg.n_layers and offloaded == list(range(offloaded[0], plain.cfg.n_layers))
    assert torch.equal(logits(model), logits(plain))
    with pytest.raises(ValueError, match="max_memory is read only with a computed device_map"):
        lens_det.from_pretrained(directory, max_memory={"cpu": 300_000})
    with pytest.raises(ValueError, match="cannot be offloaded to disk.*at least \\d+ bytes more"):
        lens_det.from_pretrained(directory, device_map="auto", max_memory={"cpu": 10_000})
    with pytest.raises(ValueError, match="cannot be offloaded to disk.*map 'embed'"):
        lens_det.from_pretrained(directory, device_map={"model.embed_tokens": "disk", "": "cpu"})
    with pytest.raises(ValueError, match="pass device or device_map, not both"):
        lens_det.from_pretrained(directory, device="cpu", device_map="cpu")


def test_a_device_map_reads_each_tensor_lazily(saved, monkeypatch):
    """With a device_map no whole state dict is read: safetensors.torch.load_file is never called, and the
    disk-offloaded tensors are not read at load time at all."""
    import safetensors.torch

    from lens_det.hf import checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the whole state dict was read")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    read = []
    original = checkpoint.Checkpoint.load
    monkeypatch.setattr(checkpoint.Checkpoint, "load",
                        lambda self, key, *a: read.append(key) or original(self, key, *a))
    directory = saved("tiny-gemma3")
    n = hf_config_from_name("tiny-gemma3").num_hidden_layers
    lens_det.from_pretrained(directory, device_map=_half_cpu_half_disk(n))
    assert read and not any(k.startswith(f"model.layers.{n - 1}.self_attn.") for k in read)


def test_a_converter_that_computes_tensors_falls_back_to_reading_them(saved, monkeypatch):
    from lens_det.convert import gemma

    directory = saved("tiny-gemma3")
    plain = lens_det.from_pretrained(directory)
    convert = gemma.state_dict_from_hf
    monkeypatch.setattr(gemma, "state_dict_from_hf",
                        lambda sd, cfg: {k: v.clone() for k, v in convert(sd, cfg).items()})
    assert_same_weights(lens_det.from_pretrained(directory), plain)


def test_device_map_keys_most_specific_wins():
    """A container key ("model") places every part a more specific key leaves; order does not matter."""
    placed = resolve_device_map({"model.layers.1": "disk", "model": "cpu", "model.layers": "meta"}, 3, tied=True)
    assert placed == {"embed": torch.device("cpu"), "blocks.0": torch.device("meta"), "blocks.1": "disk",
                      "blocks.2": torch.device("meta"), "ln_final": torch.device("cpu")}
    assert resolve_device_map({"model": "cpu", "lm_head": "disk"}, 2)["unembed"] == "disk"
    with pytest.raises(ValueError, match="names no part of the decoder"):
        resolve_device_map({"model.vision_tower": "cpu", "": "cpu"}, 2)


# --- 3. transformers keywords lens_det does not take ---

@pytest.mark.parametrize("keyword, value, says", [
    ("revision", "main", "snapshot_download"),
    ("cache_dir", "/tmp", "snapshot_download"),
    ("token", "hf_x", "snapshot_download"),
    ("local_files_only", True, "pass a local directory"),
    ("subfolder", "text", "subfolder's own path"),
    ("trust_remote_code", True, "never runs a checkpoint's code"),
    ("quantization_config", {}, "quantized loading is not supported.*bfloat16"),
    ("load_in_8bit", True, "quantized loading is not supported.*bfloat16"),
    ("output_attentions", True, "run_with_cache.*hook_pattern"),
    ("use_safetensors", True, r"reads \*\.safetensors when"),
])
def test_transformers_keywords_say_what_to_do_instead(saved, keyword, value, says):
    with pytest.raises(TypeError, match=f"from_pretrained\\(\\) does not take '{keyword}'.*{says}"):
        lens_det.from_pretrained(saved("tiny-bloom"), **{keyword: value})


def test_unknown_keywords_list_what_is_taken_and_processing_still_works(saved, model_pair):
    directory = saved("tiny-bloom")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['fold_lnn'\] \(did you mean fold_ln\?\)"
                                        r"\. It takes dtype, .*device_map.*weight-processing options are fold_ln"):
        lens_det.from_pretrained(directory, fold_lnn=True)
    with pytest.raises(TypeError, match="sliding_window.*Config overrides .* are not taken"):
        lens_det.from_pretrained(directory, sliding_window=4)
    with pytest.raises(TypeError, match="from_config\\(\\) does not take 'device_map'.*model.place"):
        lens_det.from_config("tiny-bloom", device_map="auto")
    processed = lens_det.from_pretrained(directory, fold_ln=True)
    assert processed.processing and processed.processing[0] == "fold_ln"


# --- 4. meta-device construction ---

def test_from_config_on_meta_is_an_empty_model_that_loads(saved):
    reference = lens_det.from_config("tiny-gemma3")
    with torch.device("meta"):
        model = lens_det.from_config("tiny-gemma3")
    assert lens_det.from_config("tiny-gemma3", device="meta").state_dict().keys() == reference.state_dict().keys()
    shapes = {k: (v.shape, v.dtype) for k, v in reference.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == shapes
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    assert torch.equal(logits(model), logits(reference))
    with torch.device("meta"), pytest.raises(ValueError, match="under torch.device\\('meta'\\).*drop the weights"):
        lens_det.from_pretrained(saved("tiny-gemma3"))
    with pytest.raises(ValueError, match="device='meta' would drop the weights"):
        lens_det.from_pretrained(saved("tiny-gemma3"), device="meta")


# --- 5. placements that would lose weights, and CUDA without a GPU ---

def test_place_refuses_maps_that_would_drop_weights(saved):
    model = lens_det.from_config("tiny-gemma3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"puts \['blocks.0'\] on the meta device, which would drop their weights"):
        model.place({"blocks.0": "meta", "": "cpu"})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing moved
    with pytest.raises(ValueError, match="cannot offload .*'disk'.*from_pretrained"):
        model.place({"blocks.0": "disk", "": "cpu"})
    empty = lens_det.from_config("tiny-gemma3", device="meta")
    with pytest.raises(ValueError, match="weights on the meta device \\(never loaded\\).*to_empty"):
        empty.place({"": "cpu"})
    n = model.cfg.n_layers
    offloaded = lens_det.from_pretrained(saved("tiny-gemma3"), device_map=_half_cpu_half_disk(n))
    with pytest.raises(ValueError, match=f"'blocks.{n - 1}'.*are offloaded.*from_pretrained"):
        offloaded.place({"": "cpu"})


@pytest.mark.skipif(not NO_CUDA, reason="checks the error on machines without CUDA")
@pytest.mark.parametrize("call", [
    lambda d: lens_det.from_pretrained(d, device="cuda"),
    lambda d: lens_det.from_pretrained(d, device="cuda:1"),
    lambda d: lens_det.from_pretrained(d, device_map={"model.layers.0": "cuda:0", "": "cpu"}),
    lambda d: lens_det.from_pretrained(d, device_map=0),
    lambda d: lens_det.from_config("tiny-bloom", device="cuda"),
    lambda d: lens_det.from_config("tiny-bloom").place({"": "cuda:1"}),
], ids=["device", "device-index", "device_map-dict", "device_map-int", "from_config", "place"])
def test_cuda_without_a_gpu_is_a_one_line_value_error(saved, call):
    with pytest.raises(ValueError, match=r"^[^\n]*no CUDA device is available on this machine[^\n]*use 'cpu'$"):
        call(saved("tiny-bloom"))


def test_an_in_memory_model_takes_no_device_map(model_pair):
    hf, _ = model_pair("tiny-bloom")
    with pytest.raises(ValueError, match="from_hf_model\\(hf_model\\), then model.place"):
        lens_det.from_pretrained(hf, device_map="auto")
