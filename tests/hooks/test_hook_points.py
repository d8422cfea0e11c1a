"""Golden hook-name lists per family, and every declared hook fires on every forward."""

import pytest
import torch

from tests.helpers import ALL, batch

COMMON_BLOCK = [
    "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
    "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
    "attn.hook_result", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_in",
    "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input",
]
ROPE = ["attn.hook_rot_q", "attn.hook_rot_k", "mlp.hook_pre_linear"]
SANDWICH = ["ln1_post.hook_scale", "ln1_post.hook_normalized", "ln2_post.hook_scale", "ln2_post.hook_normalized"]
QK_NORM = ["attn.q_norm.hook_scale", "attn.q_norm.hook_normalized",
           "attn.k_norm.hook_scale", "attn.k_norm.hook_normalized"]
V_NORM = ["attn.v_norm.hook_scale", "attn.v_norm.hook_normalized"]
MOE = ["hook_dense_mlp_out", "hook_moe_out", "ln2_dense_post.hook_scale", "ln2_dense_post.hook_normalized",
       "ln2_moe.hook_scale", "ln2_moe.hook_normalized", "ln2_moe_post.hook_scale", "ln2_moe_post.hook_normalized",
       "moe.router_norm.hook_scale", "moe.router_norm.hook_normalized", "moe.hook_router_logits",
       "moe.hook_expert_weights", "moe.hook_expert_indices", "moe.hook_top_k_weights", "moe.hook_out",
       "moe.hook_pre", "moe.hook_pre_linear", "moe.hook_post"]
GLOBAL = ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"]
PLE_GLOBAL = ["hook_per_layer_inputs", "ple.hook_tokens", "ple.hook_proj", "ple.ln.hook_scale",
              "ple.ln.hook_normalized"]
PLE_BLOCK = ["hook_per_layer_input", "ple.hook_pre", "ple.hook_post", "ple.ln.hook_scale", "ple.ln.hook_normalized",
             "hook_ple_out"]
ALTUP_GLOBAL = ["streams_in.hook_streams", "streams_out.hook_streams", "streams_out.hook_mean"]
ALTUP_BLOCK = ["hook_streams_pre", "hook_streams_post", "altup.hook_predict_coefs", "altup.hook_predictions",
               "altup.hook_correct_coefs", "altup.hook_innovation", "altup.hook_corrected", "laurel.hook_low",
               "laurel.ln.hook_scale",
               "laurel.ln.hook_normalized", "hook_laurel_out"]
# KV-sharing consumer layers project no keys / values: these hooks are absent there (their source layer has them)
KV_OWN = ["attn.hook_k", "attn.hook_v", "attn.hook_rot_k", "attn.k_norm.hook_scale", "attn.k_norm.hook_normalized",
          "attn.v_norm.hook_scale", "attn.v_norm.hook_normalized"]
GOLDEN = {
    "tiny-bloom": (GLOBAL + ["embed.ln.hook_scale", "embed.ln.hook_normalized"], COMMON_BLOCK),
    "tiny-bloom-resid": (GLOBAL + ["embed.ln.hook_scale", "embed.ln.hook_normalized"], COMMON_BLOCK),
    "tiny-gemma": (GLOBAL, COMMON_BLOCK + ROPE),
    "tiny-gemma2": (GLOBAL, COMMON_BLOCK + ROPE + SANDWICH),
    "tiny-vaultgemma": (GLOBAL, COMMON_BLOCK + ROPE),
    "tiny-gemma3": (GLOBAL, COMMON_BLOCK + ROPE + SANDWICH + QK_NORM),
    "tiny-gemma4": (GLOBAL, COMMON_BLOCK + ROPE + SANDWICH + QK_NORM + V_NORM),
    "tiny-gemma4-ple": (GLOBAL + PLE_GLOBAL, COMMON_BLOCK + ROPE + SANDWICH + QK_NORM + V_NORM + PLE_BLOCK),
    "tiny-gemma4-moe": (GLOBAL, COMMON_BLOCK + ROPE + SANDWICH + QK_NORM + V_NORM + MOE),
    "tiny-gemma3n": (GLOBAL + PLE_GLOBAL + ALTUP_GLOBAL,
                     COMMON_BLOCK + ROPE + SANDWICH + QK_NORM + V_NORM + PLE_BLOCK + ALTUP_BLOCK),
}


@pytest.mark.parametrize("name", ALL)
def test_golden_hook_names(model_pair, name):
    _, model = model_pair(name)
    top, per_block = GOLDEN[name]
    c = model.cfg
    expected = set(top) | {f"blocks.{i}.{h}" for i in range(c.n_layers) for h in per_block
                           if c.layer_kv_source(i) is None or h not in KV_OWN}
    # the gaussian top-k gate's hook exists on the sparse layers only (Gemma 3n: 0, 1 and 4)
    expected |= {f"blocks.{i}.mlp.hook_sparse_gate" for i, p in enumerate(model.config.gate_sparsity or ()) if p}
    assert set(model.hook_dict) == expected


@pytest.mark.parametrize("name", ALL)
def test_every_hook_fires_with_tl_shapes(model_pair, name):
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab, batch_size=2, length=7)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, attention_mask=mask)
    finally:
        model.set_use_attn_result(False)
        model.set_use_hook_mlp_in(False)
        model.set_use_split_qkv_input(False)
    attn_in = {f"blocks.{i}.hook_attn_in" for i in range(model.cfg.n_layers)}  # the alternative to q/k/v_input
    assert set(cache.keys()) == set(model.hook_dict) - attn_in
    c = model.cfg
    assert cache["blocks.0.hook_q_input"].shape == (2, 7, c.n_heads, c.d_model)
    assert cache["blocks.0.hook_k_input"].shape == (2, 7, c.n_key_value_heads, c.d_model)
    assert cache["blocks.0.attn.hook_q"].shape == (2, 7, c.n_heads, c.d_head)
    assert cache["blocks.0.attn.hook_k"].shape == (2, 7, c.n_key_value_heads, c.d_head)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, c.n_heads, 7, 7)
    assert cache["blocks.0.attn.hook_result"].shape == (2, 7, c.n_heads, c.d_model)
    assert cache["blocks.0.hook_resid_pre"].shape == (2, 7, c.d_model)
    assert cache["ln_final.hook_scale"].shape == (2, 7, 1)
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])


def test_per_layer_geometry_shapes(model_pair):
    """Gemma 4: full-attention layers have their own head dim and kv-head count; every attention hook of a layer
    uses that layer's (cfg.layer_d_head(i), cfg.layer_n_key_value_heads(i)), and the KV cache stores them."""
    _, model = model_pair("tiny-gemma4")
    c = model.cfg
    assert c.d_head_per_layer is not None and len(set(c.d_head_per_layer)) == 2
    tokens, mask = batch("left", c.d_vocab, batch_size=2, length=7)
    cache = model.new_cache()
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, acts = model.run_with_cache(tokens, attention_mask=mask, kv_cache=cache)
    finally:
        model.set_use_attn_result(False)
    for i in range(c.n_layers):
        d, h_kv = c.layer_d_head(i), c.layer_n_key_value_heads(i)
        a = f"blocks.{i}.attn."
        assert acts[a + "hook_q"].shape == acts[a + "hook_z"].shape == (2, 7, c.n_heads, d)
        for name in ("hook_k", "hook_v", "hook_rot_k", "k_norm.hook_normalized", "v_norm.hook_normalized"):
            assert acts[a + name].shape == (2, 7, h_kv, d), (i, name)
        assert acts[a + "v_norm.hook_scale"].shape == (2, 7, h_kv, 1)
        assert acts[a + "hook_result"].shape == (2, 7, c.n_heads, c.d_model)
        assert cache.layers[i].keys.shape[1:] == cache.layers[i].values.shape[1:]
        assert cache.layers[i].keys.shape[1] == h_kv
        assert cache.layers[i].keys.shape[-1] == d
        assert model.blocks[i].attn.W_Q.shape == (c.n_heads, c.d_model, d)
        assert model.blocks[i].attn.W_O.shape == (c.n_heads, d, c.d_model)
        if c.layer_k_eq_v(i):  # K = V: the values are the k projection's output (before k_norm / RoPE)
            assert torch.equal(acts[a + "hook_v"], acts[a + "hook_k"])
            assert torch.equal(model.blocks[i].attn.W_V, model.blocks[i].attn.W_K)


def test_hook_result_is_off_by_default(model_pair):
    _, model = model_pair("tiny-gemma2")
    tokens, _ = batch("none", model.cfg.d_vocab, batch_size=1, length=4)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    assert not any(k.endswith("hook_result") for k in cache.keys())
    assert len(cache.keys()) == len(model.hook_dict) - len(model.disabled_hook_points())


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma3"])
def test_edited_norm_scale_is_applied(model_pair, name):
    """An edit to hook_scale changes the norm output as TransformerLens defines it: (x - mean) / scale * w + b."""
    _, model = model_pair(name)
    tokens, _ = batch("none", model.cfg.d_vocab, batch_size=1, length=5)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        doubled = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.ln1.hook_scale", lambda s, hook: s * 2)],
                                       return_type=None)
        _, patched = model.run_with_cache(
            tokens, names_filter="blocks.0.ln1.hook_normalized",
        )
    assert doubled is None
    x = cache["blocks.0.hook_resid_pre"].float()
    norm = model.blocks[0].ln1
    scale = cache["blocks.0.ln1.hook_scale"] * 2
    if model.cfg.norm == "layernorm":
        expected = (x - x.mean(-1, keepdim=True)) / scale * norm.w.float() + norm.b.float()
    else:
        expected = x / scale * (1 + norm.w.float())
    hooks = [("blocks.0.ln1.hook_scale", lambda s, hook: s * 2)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        _, edited = model.run_with_cache(tokens, names_filter="blocks.0.ln1.hook_normalized")
    got = edited["blocks.0.ln1.hook_normalized"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)  # fp32 x / s vs x * rsqrt: ulp-level
    assert not torch.allclose(got, patched["blocks.0.ln1.hook_normalized"])
