"""A left-padded batch without its mask (issue 19, item 7).

`tokens, mask = model.to_tokens(texts)` pads on the left; `model(tokens)` without the mask used to attend to the pads
(here the padded row's real-token logits move by ~1 on tiny-bloom and ~5.6 on tiny-gemma2). The rule: with no
attention_mask and nothing cached, a batch of two or more rows where some, but not all, rows start with the pad token
(and the pad token is not BOS) is refused with what to pass. Nothing is inferred, so real tokens equal to the pad id are
never masked (TransformerLens 2.x's mask inference masks them): a single row, or rows that all start with the pad id,
run unmasked, and `attention_mask=torch.ones_like(tokens)` says so explicitly. The pair to_tokens returns carries its
mask, so `model(model.to_tokens(texts))` runs as `model(texts)` does (the mask, and positions from the mask).

Numbers are compared with HF's at tolerance 0.0: the same ops on the same inputs (docs/numerics.md).
"""

import pytest
import torch

import lens_det
from lens_det.components.positions import positions_from_mask
from lens_det.parity.models import random_hf_model
from lens_det.tokenizer import char_tokenizer

TEXTS = ["Hello there", "Hi"]  # row 1 is left-padded by to_tokens
NAMES = ["tiny-bloom", "tiny-gemma2"]  # pad 3 / bos 1 (ALiBi) and pad 0 / bos 2 (RoPE), both eager in HF


def _pair(name):
    hf = random_hf_model(name, torch.float32)
    model = lens_det.from_hf_model(hf)
    model.tokenizer = char_tokenizer(model.config)  # what from_config attaches
    return hf, model


def _hf_logits(hf, model, tokens, mask, positions):
    kw = {} if model.config.positional == "alibi" else {"position_ids": positions}
    with torch.no_grad():
        return hf(tokens, attention_mask=mask, use_cache=False, **kw).logits


CALLS = {
    "forward": lambda m, t: m(t),
    "run_with_cache": lambda m, t: m.run_with_cache(t),
    "run_with_hooks": lambda m, t: m.run_with_hooks(t, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x)]),
    "generate": lambda m, t: m.generate(t, max_new_tokens=2),
    "forward with an empty cache": lambda m, t: m(t, kv_cache=m.new_cache()),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("name", NAMES)
def test_a_left_padded_batch_without_its_mask_is_refused(name, call):
    _, model = _pair(name)
    tokens, mask = model.to_tokens(TEXTS)
    assert tokens[1, 0] == model.tokenizer.pad_token_id and mask[1, 0] == 0  # what the rule looks at
    with torch.no_grad(), pytest.raises(ValueError, match=r"start with the pad token.*attention_mask=mask"):
        CALLS[call](model, tokens)


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_cache_is_left_empty_by_the_refusal(name):
    _, model = _pair(name)
    tokens, _ = model.to_tokens(TEXTS)
    kv = model.new_cache()
    with torch.no_grad(), pytest.raises(ValueError, match="attention_mask=mask"):
        model(tokens, kv_cache=kv)
    assert kv.length == 0 and kv.batch_size is None


@pytest.mark.parametrize("name", NAMES)
def test_the_to_tokens_pair_runs_with_its_mask_and_mask_positions(name):
    """model(pair) is model(texts): the mask and HF generate's mask positions; bit-identical to HF given the same
    mask and positions. Ignoring the mask (an explicit all-ones mask) is measurably different on the padded row."""
    hf, model = _pair(name)
    pair = model.to_tokens(TEXTS)
    tokens, mask = pair
    ref = _hf_logits(hf, model, tokens, mask, positions_from_mask(mask))
    with torch.no_grad():
        assert torch.equal(model(pair), ref)
        assert torch.equal(model(pair), model(TEXTS))
        assert torch.equal(model.run_with_cache(pair)[0], ref)
        assert torch.equal(model.run_with_hooks(pair, fwd_hooks=[]), ref)
        unmasked = model(tokens, attention_mask=torch.ones_like(tokens))
    real = mask[1].bool()
    assert (unmasked[1, real] - ref[1, real]).abs().max() > 1e-3  # what the unmasked call silently returned
    assert torch.equal(unmasked[0], ref[0])  # the unpadded row is the same either way
    out = model.generate(pair, max_new_tokens=3, stop_tokens=[])
    assert torch.equal(out.tokens, model.generate(tokens, mask, max_new_tokens=3, stop_tokens=[]).tokens)
    with pytest.raises(ValueError, match="carries its own mask"):
        model(pair, attention_mask=mask)


@pytest.mark.parametrize("name", NAMES)
def test_real_tokens_equal_to_the_pad_id_are_never_masked(name):
    """A single row, rows that all start with the pad id, rows that end with it (right padding does not change a
    causal model's real positions), a pad id equal to BOS, and decode steps with a cache all run unmasked: each is
    bit-identical to HF with an all-ones mask (and the right-padded rows' real positions to HF with their mask)."""
    hf, model = _pair(name)
    pad, bos = model.tokenizer.pad_token_id, model.tokenizer.bos_token_id
    one_row = torch.tensor([[pad, 40, 41, 42]])
    all_rows = torch.tensor([[pad, 40, 41, 42], [pad, pad, 50, 51]])
    for tokens in (one_row, all_rows):
        ones = torch.ones_like(tokens)
        with torch.no_grad():
            assert torch.equal(model(tokens), _hf_logits(hf, model, tokens, ones, None))
    right, right_mask = model.to_tokens(TEXTS, padding_side="right")
    assert right[1, -1] == pad
    real = right_mask.bool()
    with torch.no_grad():
        assert torch.equal(model(right)[real], _hf_logits(hf, model, right, right_mask, None)[real])
    model.tokenizer.pad_token = model.tokenizer.bos_token  # pad == BOS: a leading pad cannot be told from a BOS
    try:
        as_bos = torch.tensor([[bos, 40, 41], [40, 41, 42]])
        with torch.no_grad():
            assert torch.equal(model(as_bos), _hf_logits(hf, model, as_bos, torch.ones_like(as_bos), None))
    finally:
        model.tokenizer = char_tokenizer(model.config)
    tokens, mask = model.to_tokens(TEXTS)
    kv = model.new_cache()
    with torch.no_grad():
        model(tokens, attention_mask=mask, kv_cache=kv)
        step = torch.tensor([[pad], [40]])  # a generated pad id is a real token; nothing to infer with a cache
        model(step, kv_cache=kv)
    assert kv.length == tokens.shape[1] + 1
