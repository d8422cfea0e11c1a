"""hook_for_hf_path proven by numbers: plain torch forward hooks on the HF model's modules catch each module's input or
output, and the lens_det hook the path resolves to must carry exactly that tensor (torch.equal; attn.hook_z with its
heads flattened). lens_det is bit-identical to HF in float32 eager (tests/parity), so 0.0 is the contract."""

from __future__ import annotations

import pytest
import torch

import lens_det
from lens_det.parity.models import random_hf_model
from lens_det.sae import hook_for_hf_path, hook_width

L = 1  # the layer the paths name
GEMMA_SANDWICH = {  # Gemma 2 / 3: pre- and post-norms around attention and MLP
    f"model.layers.{L}.input": f"blocks.{L}.hook_resid_pre",
    f"model.layers.{L}.output": f"blocks.{L}.hook_resid_post",
    f"model.layers.{L}.input_layernorm.input": f"blocks.{L}.hook_resid_pre",
    f"model.layers.{L}.input_layernorm.output": f"blocks.{L}.ln1.hook_normalized",
    f"model.layers.{L}.self_attn.o_proj.input": f"blocks.{L}.attn.hook_z",
    f"model.layers.{L}.post_attention_layernorm.output": f"blocks.{L}.hook_attn_out",
    f"model.layers.{L}.pre_feedforward_layernorm.input": f"blocks.{L}.hook_resid_mid",
    f"model.layers.{L}.pre_feedforward_layernorm.output": f"blocks.{L}.ln2.hook_normalized",
    f"model.layers.{L}.mlp.down_proj.input": f"blocks.{L}.mlp.hook_post",
    f"model.layers.{L}.post_feedforward_layernorm.output": f"blocks.{L}.hook_mlp_out",
    "model.embed_tokens.output": "hook_embed",
    "model.norm.output": "ln_final.hook_normalized",
}
GEMMA_1 = {  # no sandwich norms: the projections' outputs are what the residual adds
    f"model.layers.{L}.input": f"blocks.{L}.hook_resid_pre",
    f"model.layers.{L}.output": f"blocks.{L}.hook_resid_post",
    f"model.layers.{L}.input_layernorm.output": f"blocks.{L}.ln1.hook_normalized",
    f"model.layers.{L}.self_attn.o_proj.input": f"blocks.{L}.attn.hook_z",
    f"model.layers.{L}.self_attn.o_proj.output": f"blocks.{L}.hook_attn_out",
    f"model.layers.{L}.post_attention_layernorm.input": f"blocks.{L}.hook_resid_mid",
    f"model.layers.{L}.post_attention_layernorm.output": f"blocks.{L}.ln2.hook_normalized",
    f"model.layers.{L}.mlp.down_proj.input": f"blocks.{L}.mlp.hook_post",
    f"model.layers.{L}.mlp.down_proj.output": f"blocks.{L}.hook_mlp_out",
    "model.embed_tokens.output": "hook_embed",
    "model.norm.output": "ln_final.hook_normalized",
}
BLOOM = {
    f"transformer.h.{L}.input": f"blocks.{L}.hook_resid_pre",
    f"transformer.h.{L}.output": f"blocks.{L}.hook_resid_post",
    f"transformer.h.{L}.input_layernorm.output": f"blocks.{L}.ln1.hook_normalized",
    f"transformer.h.{L}.self_attention.dense.input": f"blocks.{L}.attn.hook_z",
    f"transformer.h.{L}.self_attention.dense.output": f"blocks.{L}.hook_attn_out",
    f"transformer.h.{L}.post_attention_layernorm.input": f"blocks.{L}.hook_resid_mid",
    f"transformer.h.{L}.post_attention_layernorm.output": f"blocks.{L}.ln2.hook_normalized",
    f"transformer.h.{L}.mlp.dense_4h_to_h.input": f"blocks.{L}.mlp.hook_post",
    f"transformer.h.{L}.mlp.dense_4h_to_h.output": f"blocks.{L}.hook_mlp_out",
    "transformer.ln_f.output": "ln_final.hook_normalized",
}
CASES = {"tiny-gemma2": GEMMA_SANDWICH, "tiny-gemma3": GEMMA_SANDWICH, "tiny-gemma": GEMMA_1, "tiny-bloom": BLOOM}


@pytest.fixture(scope="module")
def pairs():
    built = {}

    def get(name):
        if name not in built:
            hf = random_hf_model(name)
            built[name] = hf, lens_det.from_hf_model(hf)
        return built[name]
    return get


def hf_tensors(hf, paths, tokens) -> dict[str, torch.Tensor]:
    """Each HF module's input (its first positional argument, or hidden_states=) or output (the first element of a
    tuple), caught by plain torch forward hooks."""
    caught, handles = {}, []
    for path in paths:
        module_name, _, io = path.rpartition(".")

        def hook(module, args, kwargs, out, path=path, io=io):
            value = (args[0] if args else kwargs["hidden_states"]) if io == "input" else out
            caught[path] = (value[0] if isinstance(value, tuple) else value).detach().clone()
        handles.append(hf.get_submodule(module_name).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            hf(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    return caught


def lens_value(cache, hook):
    value = cache[hook]
    return value.flatten(-2) if hook.endswith("attn.hook_z") else value


@pytest.mark.parametrize("name", list(CASES))
def test_hf_paths_carry_the_hf_tensor(pairs, name):
    hf, model = pairs(name)
    expected = CASES[name]
    assert {p: hook_for_hf_path(model.config, p) for p in expected} == expected
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    caught = hf_tensors(hf, expected, tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for path, hook in expected.items():
        got, want = lens_value(cache, hook), caught[path]
        assert got.shape == want.shape and torch.equal(got, want), f"{path} -> {hook}"


def test_bloom_embedding_site(pairs):
    """BUG (sites.py MODEL_SITES): Bloom's hook_embed is the output of word_embeddings_layernorm (lens_det's embed
    includes embed.ln), not of word_embeddings; the path resolving to hook_embed must be the layernorm's output."""
    hf, model = pairs("tiny-bloom")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    paths = ["transformer.word_embeddings.output", "transformer.word_embeddings_layernorm.output"]
    caught = hf_tensors(hf, paths, tokens)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    assert torch.equal(cache["hook_embed"], caught["transformer.word_embeddings_layernorm.output"])
    assert not torch.equal(cache["hook_embed"], caught["transformer.word_embeddings.output"])
    assert hook_for_hf_path(model.config, "transformer.word_embeddings_layernorm.output") == "hook_embed"
    with pytest.raises(ValueError):
        hook_for_hf_path(model.config, "transformer.word_embeddings.output")


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_transcoder_input_is_not_hook_mlp_in(pairs, name):
    """The trap: pre_feedforward_layernorm.output is ln2.hook_normalized, and hook_mlp_in (the residual before the
    norm, TransformerLens' name) is a different tensor."""
    hf, model = pairs(name)
    path = f"model.layers.{L}.pre_feedforward_layernorm.output"
    assert hook_for_hf_path(model.config, path) == f"blocks.{L}.ln2.hook_normalized"
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    caught = hf_tensors(hf, [path], tokens)[path]
    model.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
    finally:
        model.set_use_hook_mlp_in(False)
    assert torch.equal(cache[f"blocks.{L}.ln2.hook_normalized"], caught)
    assert not torch.equal(cache[f"blocks.{L}.hook_mlp_in"], caught)
    assert torch.equal(cache[f"blocks.{L}.hook_mlp_in"], cache[f"blocks.{L}.hook_resid_mid"])


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model.", "model."])
def test_decoder_prefixes(pairs, prefix):
    cfg = pairs("tiny-gemma3")[1].config
    assert hook_for_hf_path(cfg, f"{prefix}layers.2.output") == "blocks.2.hook_resid_post"
    assert hook_for_hf_path(cfg, f"{prefix}layers.2.pre_feedforward_layernorm.output") == "blocks.2.ln2.hook_normalized"
    assert hook_for_hf_path(cfg, f"{prefix}embed_tokens.output") == "hook_embed"


def test_unknown_paths(pairs):
    cfg = pairs("tiny-gemma2")[1].config
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.gate_proj.output' has no lens_det hook here; .*"
                                         r"layers\.\{i\}\.pre_feedforward_layernorm\.output"):
        hook_for_hf_path(cfg, "model.layers.1.mlp.gate_proj.output")
    with pytest.raises(ValueError, match=r"has no lens_det hook here; .*embed_tokens\.output, norm\.output"):
        hook_for_hf_path(cfg, "model.rotary_emb.output")
    with pytest.raises(ValueError, match=r"must end in \.input or \.output"):
        hook_for_hf_path(cfg, "model.layers.1.pre_feedforward_layernorm")
    # Gemma 2's o_proj output is not what the residual adds (post_attention_layernorm follows): no hook
    with pytest.raises(ValueError, match="has no lens_det hook here"):
        hook_for_hf_path(cfg, "model.layers.1.self_attn.o_proj.output")


def test_layer_out_of_range(pairs):
    cfg = pairs("tiny-gemma2")[1].config
    assert cfg.n_layers == 4
    assert hook_for_hf_path(cfg, "model.layers.3.output") == "blocks.3.hook_resid_post"
    with pytest.raises(ValueError, match=r"'model.layers.4.output' names layer 4; the model has 4"):
        hook_for_hf_path(cfg, "model.layers.4.output")
    with pytest.raises(ValueError, match="names layer 17; the model has 4"):
        hook_for_hf_path(cfg, "model.layers.17.pre_feedforward_layernorm.output")


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma2", "tiny-bloom"])
def test_hook_width(pairs, name):
    """Widths against the tensors a forward puts at the hooks (tiny-gemma: n_heads * d_head = 96 != d_model 64)."""
    model = pairs(name)[1]
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for hook in ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post",
                 "blocks.1.hook_mlp_out", "blocks.1.ln2.hook_normalized", "blocks.1.attn.hook_z"]:
        assert hook_width(model.config, hook) == lens_value(cache, hook).shape[-1], hook
    c = model.config
    assert hook_width(c, "blocks.0.attn.hook_z") == c.n_heads * c.layer_d_head(0)
    assert hook_width(c, "blocks.0.mlp.hook_post") == c.layer_d_mlp(0)


def test_hook_width_refuses_other_layouts(pairs):
    cfg = pairs("tiny-gemma2")[1].config
    for hook in ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_q"]:
        with pytest.raises(ValueError, match=r"an SAE is spliced at a \[batch, pos, width\] hook or at "
                                             rf"attn.hook_z, not at {hook}"):
            hook_width(cfg, hook)
