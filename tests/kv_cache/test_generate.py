"""Generation equals HF generate: same greedy tokens and per-step logits (0.0), cache on and off."""

import pytest
import torch

from tests.helpers import ALL, DTYPES, batch


def hf_generate(hf, tokens, mask, n, use_cache=True):
    with torch.no_grad():
        return hf.generate(tokens, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=use_cache,
                           output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ALL)
def test_greedy_equals_hf_generate(model_pair, name, dtype, use_cache):
    hf, model = model_pair(name, dtype)
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    ref = hf_generate(hf, tokens, mask, 10, use_cache)
    out = model.generate(tokens, mask, max_new_tokens=10, stop_tokens=[], use_kv_cache=use_cache)
    assert torch.equal(out.tokens, ref.sequences)
    assert len(out.logits) == len(ref.logits) == 10
    for ours, theirs in zip(out.logits, ref.logits):
        assert torch.equal(ours, theirs)


def test_bloom_greedy_text_same_with_and_without_cache(model_pair):
    """TransformerLens 2.8's Bloom produced different text with its KV cache on (ALiBi row 0 on cached
    steps); here the cached and uncached greedy continuations of a left-padded batch are identical."""
    _, model = model_pair("tiny-bloom")
    tokens, mask = batch("left", model.cfg.d_vocab, length=10)
    cached = model.generate(tokens, mask, max_new_tokens=24, stop_tokens=[])
    uncached = model.generate(tokens, mask, max_new_tokens=24, stop_tokens=[], use_kv_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # fp32 prefill-vs-decode matmul shapes


def test_stop_tokens_pad_finished_rows(model_pair):
    _, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    free = model.generate(tokens, mask, max_new_tokens=6, stop_tokens=[])
    stop = int(free.tokens[0, 8])  # row 0's first generated token
    out = model.generate(tokens, mask, max_new_tokens=6, stop_tokens=[stop], pad_token_id=0)
    assert out.tokens[0, 8] == stop and (out.tokens[0, 9:] == 0).all()
    for row in range(3):  # each row follows the free run up to and including its first stop token
        gen = free.tokens[row, 8:].tolist()
        n = gen.index(stop) + 1 if stop in gen else len(gen)
        assert out.tokens[row, 8 : 8 + n].tolist() == gen[:n]
        assert (out.tokens[row, 8 + n :] == 0).all()


def test_sampling_is_seeded_and_filtered(model_pair):
    _, model = model_pair("tiny-gemma")
    tokens, mask = batch("left", model.cfg.d_vocab, length=6)
    draws = [model.generate(tokens, mask, max_new_tokens=8, do_sample=True, temperature=0.8, top_k=5, top_p=0.9,
                            stop_tokens=[], generator=torch.Generator().manual_seed(7)).tokens for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    greedy = model.generate(tokens, mask, max_new_tokens=8, stop_tokens=[]).tokens
    top1 = model.generate(tokens, mask, max_new_tokens=8, do_sample=True, top_k=1, stop_tokens=[],
                          generator=torch.Generator().manual_seed(1)).tokens
    assert torch.equal(top1, greedy)  # top-k 1 sampling is greedy


def test_hooks_active_and_outputs_returned(model_pair):
    _, model = model_pair("tiny-gemma3")
    tokens, mask = batch("left", model.cfg.d_vocab, length=6)
    seen = []
    hook = ("blocks.0.hook_resid_pre", lambda x, hook: seen.append(x.shape[1]))
    out = model.generate(tokens, mask, max_new_tokens=4, stop_tokens=[], fwd_hooks=[hook], return_cache=True,
                         return_activations=True)
    assert seen[:4] == [6, 1, 1, 1]  # prefill, then one new position per cached step
    assert out.kv_cache.length == 9  # the last generated token has not been run yet
    assert out.activations["blocks.0.hook_resid_pre"].shape[:2] == (3, 10)
    assert not model.blocks[0].hook_resid_pre.fwd_hooks  # hooks removed afterwards


def test_generate_continues_from_a_cache(model_pair):
    """Prefill a left-padded prompt into a cache, then generate from it without passing the mask again."""
    _, model = model_pair("tiny-gemma2")
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    whole = model.generate(tokens, mask, max_new_tokens=5, stop_tokens=torch.tensor([]))
    cache = model.new_cache()
    with torch.no_grad():
        model(tokens[:, :6], attention_mask=mask[:, :6], position_ids="mask", kv_cache=cache)
    rest = model.generate(tokens[:, 6:], max_new_tokens=5, stop_tokens=[], kv_cache=cache)
    assert torch.equal(rest.tokens, whole.tokens[:, 6:])
    assert rest.attention_mask.shape == whole.attention_mask.shape
    with pytest.raises(ValueError, match="use_kv_cache=False"):
        model.generate(tokens, mask, kv_cache=model.new_cache(), use_kv_cache=False)
