"""KVCache behaviour: hooks under the cache, patches that persist, freeze/clone, errors that leave the cache
unchanged, and layers on several devices."""

import pytest
import torch

import lens_det
from tests.helpers import batch


def snapshot(cache):
    return [(e.start, None if e.keys is None else e.keys.clone()) for e in cache.layers], cache.mask


def same_snapshot(a, b):
    return a[1] is b[1] and all(s1 == s2 and (k1 is None and k2 is None or torch.equal(k1, k2))
                                for (s1, k1), (s2, k2) in zip(a[0], b[0]))


def test_hooks_fire_for_new_positions_with_full_key_dim(model_pair):
    _, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab, length=10)
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens[:, :6], attention_mask=mask[:, :6], kv_cache=cache)
        _, acts = model.run_with_cache(tokens[:, 6:8], attention_mask=mask[:, :8], kv_cache=cache)
    assert acts["blocks.0.attn.hook_q"].shape[1] == 2
    assert acts["blocks.1.attn.hook_pattern"].shape[-2:] == (2, 8)  # full layer: every key seen
    window = model.cfg.sliding_window
    assert acts["blocks.0.attn.hook_pattern"].shape[-2:] == (2, window - 1 + 2)  # sliding: what HF keeps


@pytest.mark.parametrize("name", ["tiny-bloom", "tiny-gemma3"])
def test_patch_at_a_decode_step_persists_like_an_uncached_rerun(model_pair, name):
    """Edit hook_v of layer 0 at position 8 during cached decoding: the edit is stored in the cache, so every
    later step sees it; the effect equals the same edit in one uncached forward. Tolerance: fp32 rounding of
    prefill-vs-decode shapes (1e-4 of the logit scale); the effect itself is orders of magnitude larger."""
    _, model = model_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab, length=12)
    delta = torch.randn(model.cfg.n_key_value_heads, model.cfg.d_head, generator=torch.Generator().manual_seed(0))

    def cached(patch: bool):
        cache, steps = model.new_cache(), []
        with torch.no_grad():
            steps.append(model(tokens[:, :5], attention_mask=mask[:, :5], position_ids="mask", kv_cache=cache))
            for t in range(5, 12):
                hooks = [("blocks.0.attn.hook_v", lambda v, hook: v + delta)] if patch and t == 8 else []
                with model.hooks(fwd_hooks=hooks):
                    steps.append(model(tokens[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids="mask",
                                       kv_cache=cache))
        return torch.cat(steps, dim=1)

    def uncached(patch: bool):
        def edit(v, hook):
            v = v.clone()
            v[:, 8] += delta
            return v
        with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.0.attn.hook_v", edit)] if patch else []):
            return model(tokens, attention_mask=mask, position_ids="mask")

    real = mask.bool()
    real[:, :8] = False  # positions before the patch are unaffected; compare the ones after
    effect_cached = (cached(True) - cached(False))[real]
    effect_uncached = (uncached(True) - uncached(False))[real]
    scale = uncached(False).abs().max()
    assert effect_uncached.abs().max() > 1e-2 * scale
    assert (effect_cached - effect_uncached).abs().max() <= 1e-4 * scale
    assert torch.equal(cached(True)[:, :8], cached(False)[:, :8])


def test_freeze_and_clone_for_shared_prefixes(model_pair):
    _, model = model_pair("tiny-gemma3")
    tokens, mask = batch("none", model.cfg.d_vocab, length=10)
    prefix = model.new_cache()
    with torch.no_grad():
        model(tokens[:, :6], kv_cache=prefix)
        prefix.freeze()
        before = snapshot(prefix)
        a = model(tokens[:, 6:8], kv_cache=prefix)
        b = model(tokens[:, 6:8], kv_cache=prefix)  # the frozen prefix did not grow
        assert torch.equal(a, b) and same_snapshot(before, snapshot(prefix)) and prefix.length == 6
        branch = prefix.clone().unfreeze()
        model(tokens[:, 6:8], kv_cache=branch)
        fresh = model.new_cache()
        model(tokens[:, :8], kv_cache=fresh)
        assert branch.length == 8 and prefix.length == 6
        for x, y in zip(branch.layers, fresh.layers):
            torch.testing.assert_close(x.keys, y.keys, rtol=0, atol=1e-5)  # chunked vs one-shot prefill


def test_errors_leave_the_cache_unchanged(model_pair):
    _, model = model_pair("tiny-bloom")
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    cache = model.new_cache(max_length=9)
    with torch.no_grad():
        model(tokens[:, :6], attention_mask=mask[:, :6], kv_cache=cache)
    before = snapshot(cache)
    with pytest.raises(ValueError, match=r"cache holds 6 tokens plus 1 new ones.*all 7"):
        model(tokens[:, 6:7], attention_mask=mask[:, 6:7], kv_cache=cache)  # HF would silently mis-mask
    with pytest.raises(ValueError, match="batch size 2 but the cache holds batch size 3"):
        model(tokens[:2, 6:7], attention_mask=mask[:2, :7], kv_cache=cache)
    with pytest.raises(ValueError, match="exceed its max_length 9"):
        model(tokens[:, 6:8].repeat(1, 2), attention_mask=torch.ones(3, 10, dtype=torch.long), kv_cache=cache)
    flipped = mask[:, :7].clone()
    flipped[0, 0] = 1
    with pytest.raises(ValueError, match="disagrees with the mask the cache was built with"):
        model(tokens[:, 6:7], attention_mask=flipped, kv_cache=cache)
    with pytest.raises(ValueError, match="different config"):
        model_pair("tiny-bloom-resid")[1](tokens[:, 6:7], kv_cache=cache)
    with pytest.raises(ValueError, match="the cache holds torch.float32 but the model runs in torch.bfloat16"):
        model_pair("tiny-bloom", torch.bfloat16)[1](tokens[:, 6:7], attention_mask=mask[:, :7], kv_cache=cache)

    def boom(x, hook):
        raise RuntimeError("hook failed")
    with pytest.raises(RuntimeError, match="hook failed"), model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", boom)]):
        model(tokens[:, 6:7], attention_mask=mask[:, :7], kv_cache=cache)
    assert same_snapshot(before, snapshot(cache))


def test_device_map_on_cpu_with_mixed_map_objects(model_pair):
    hf, _ = model_pair("tiny-gemma2")
    model = lens_det.from_hf_model(hf)
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    with torch.no_grad():
        expected = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[])
    accelerate_style = {"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                        "model.layers.1": torch.device("cpu"), "blocks.2": "cpu", "": "cpu", "lm_head": "cpu"}
    model.place(accelerate_style)
    got = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[])
    assert torch.equal(got.tokens, expected.tokens)
    with pytest.raises(ValueError, match="names no part of the decoder"):
        model.place({"vision_tower": "cpu", "": "cpu"})
    with pytest.raises(ValueError, match="places no device"):
        model.place({"blocks.0": "cpu"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_cuda_split_keeps_each_cache_entry_with_its_layer(model_pair):
    hf, _ = model_pair("tiny-gemma3")
    model = lens_det.from_hf_model(hf)
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    expected = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[])
    half = model.cfg.n_layers // 2
    device_map = {"embed": "cpu", "ln_final": "cuda:0", "unembed": "cpu",
                  **{f"blocks.{i}": ("cpu" if i < half else "cuda:0") for i in range(model.cfg.n_layers)}}
    model.place(device_map)
    out = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[], return_cache=True)
    for i, entry in enumerate(out.kv_cache.layers):
        assert entry.keys.device.type == ("cpu" if i < half else "cuda")
    assert out.tokens.shape == expected.tokens.shape


def test_accelerate_maps_with_stateless_modules_and_block_lists(model_pair):
    import copy

    hf, _ = model_pair("tiny-gemma3")
    model = lens_det.from_hf_model(hf)
    model.place({"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "cpu",
                 "model.norm": "cpu"})  # tied: no lm_head entry needed
    bloom = lens_det.from_hf_model(model_pair("tiny-bloom")[0])
    bloom.place({"transformer.word_embeddings": "cpu", "transformer.word_embeddings_layernorm": "cpu",
                 "transformer.h": "cpu", "transformer.ln_f": "cpu"})
    assert copy.copy(model.cfg).n_layers == model.cfg.n_layers


def test_device_map_with_per_layer_embeddings_and_kv_sharing(model_pair):
    """tiny-gemma4-ple under an accelerate-style map naming HF's per-layer embedding modules (they follow the
    embedding): the same greedy tokens and logits."""
    hf, _ = model_pair("tiny-gemma4-ple")
    model = lens_det.from_hf_model(hf)
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    expected = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[])
    model.place({"model.embed_tokens": "cpu", "model.embed_tokens_per_layer": "cpu",
                 "model.per_layer_model_projection": "cpu", "model.per_layer_projection_norm": "cpu",
                 "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu"})
    got = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[])
    assert torch.equal(got.tokens, expected.tokens)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kv_sharing_moves_shared_keys_to_the_consumers_device(model_pair):
    """Producers (layers 3, 4) on CUDA, their consumers (5-7) on the CPU: each consumer moves the shared keys and
    values to its own device; only producers hold cache entries."""
    hf, _ = model_pair("tiny-gemma4-ple")
    model = lens_det.from_hf_model(hf)
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    expected = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[])
    device_map = {"embed": "cuda:0", "ln_final": "cpu", **{f"blocks.{i}": ("cuda:0" if i < 5 else "cpu")
                                                           for i in range(model.cfg.n_layers)}}
    model.place(device_map)
    out = model.generate(tokens.cuda(), mask.cuda(), max_new_tokens=4, stop_tokens=[], return_cache=True)
    for i, entry in enumerate(out.kv_cache.layers):
        if i < 5:
            assert entry.keys.device.type == "cuda"
        else:
            assert entry.keys is None and entry.nbytes == 0
    assert out.tokens.shape == expected.tokens.shape
    for a, b in zip(out.logits, expected.logits):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-3)  # CUDA and CPU matmuls round differently
