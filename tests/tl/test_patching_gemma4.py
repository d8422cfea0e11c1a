"""Patching on Gemma 4 with KV sharing (tiny-gemma4-ple): an edit of a KV source's hook_k / hook_v reaches the
layers that read it, as the same edit does in HF; patch_hook's absolute positions after the logits_to_keep cut of the
KV-sharing layers. Parity without edits: tests/parity/test_gemma4.py."""

import pytest
import torch

import lens_det
from tests.helpers import batch


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_patching_a_kv_source_reaches_its_consumers(model_pair, chunk):
    """An edit of hook_k / hook_v on a producer (layer 3, read by sliding layers 5 and 6) changes what those
    consumers attend to, exactly as the same edit of k_proj / v_proj's output does in HF; layer 4 (the full
    layers' source) and its consumer 7 only change downstream. Cache off and on."""
    from transformers import DynamicCache

    hf, model = model_pair("tiny-gemma4-ple")
    tokens, mask = batch("left", model.cfg.d_vocab)
    pos = lens_det.positions_from_mask(mask)
    bump = lambda x: x * 1.5 + 0.25  # noqa: E731
    lens_hooks = [("blocks.3.attn.hook_k", lambda x, hook: bump(x)), ("blocks.3.attn.hook_v", lambda x, hook: bump(x))]
    attn = hf.model.layers[3].self_attn
    handles = [m.register_forward_hook(lambda mod, args, out: bump(out)) for m in (attn.k_proj, attn.v_proj)]
    bounds = [(0, 16)] if chunk is None else [(0, 5)] + [(a, min(a + chunk, 16)) for a in range(5, 16, chunk)]
    try:
        cache, hf_cache = (None, None) if chunk is None else (model.new_cache(), DynamicCache(config=hf.config))
        for a, b in bounds:
            kw = dict(attention_mask=mask[:, :b], position_ids=pos[:, a:b])
            with torch.no_grad(), model.hooks(fwd_hooks=lens_hooks):
                _, ours = model.run_with_cache(tokens[:, a:b], kv_cache=cache, **kw)
            with torch.no_grad():
                plain = model(tokens[:, a:b], **kw) if chunk is None else None
            from lens_det.parity.reference import capture_reference
            ref_logits, ref = capture_reference(hf, model.config, tokens[:, a:b], mask[:, :b], pos[:, a:b],
                                                past_key_values=hf_cache)
            for name in ("blocks.5.attn.hook_pattern", "blocks.6.attn.hook_z", "blocks.7.attn.hook_z",
                         "ln_final.hook_normalized"):
                assert torch.equal(ours[name], ref[name]), (a, name)
        if plain is not None:
            assert not torch.equal(plain, ref_logits)  # the edit mattered
    finally:
        for h in handles:
            h.remove()


def test_patch_hook_positions_after_the_kv_sharing_cut(model_pair):
    """After the KV-sharing layers are cut to the logits_to_keep positions, model.query_start is the first kept
    position, so lens_det.patching.patch_hook writes absolute positions where they are (and skips the cut ones)."""
    from lens_det.patching import patch_hook

    _, model = model_pair("tiny-gemma4-ple")
    tokens, mask = batch("none", model.cfg.d_vocab, length=10)
    other, _ = batch("none", model.cfg.d_vocab, length=10, seed=2)
    name = "blocks.6.hook_resid_pre"
    with torch.no_grad():
        _, clean = model.run_with_cache(other, names_filter=name)
        base = model(tokens, logits_to_keep=1)
        first = model.run_with_hooks(tokens, logits_to_keep=1, fwd_hooks=[(name, patch_hook(model, clean[name], 0))])
        last = model.run_with_hooks(tokens, logits_to_keep=1, fwd_hooks=[(name, patch_hook(model, clean[name], 9))])
    assert model.query_start == 9
    assert torch.equal(first, base) and not torch.equal(last, base)
