"""Bad input raises a clear error naming the problem and the fix; never a silent wrong answer or NaN."""

import pytest
import torch

from tests.helpers import batch


@pytest.fixture
def model(model_pair):
    return model_pair("tiny-bloom")[1]


def test_token_ids_outside_vocab(model):
    tokens, _ = batch("none", model.cfg.d_vocab)
    tokens[1, 2] = model.cfg.d_vocab
    with pytest.raises(ValueError, match=f"token id {model.cfg.d_vocab} is outside the vocabulary"):
        model(tokens)
    tokens[1, 2] = -1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(tokens)


def test_float_tokens(model):
    with pytest.raises(TypeError, match="integer token ids.*tokens.long"):
        model(torch.zeros(1, 3))
    with pytest.raises(TypeError, match="to_tokens"):
        model([1, 2, 3])


def test_mask_of_wrong_shape(model):
    tokens, mask = batch("none", model.cfg.d_vocab)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 15\).*pass the mask for all 16"):
        model(tokens, attention_mask=mask[:, 1:])


def test_mask_values_other_than_zero_one(model):
    tokens, mask = batch("none", model.cfg.d_vocab)
    mask[0, 0] = 2
    with pytest.raises(ValueError, match="only 0 .pad. and 1"):
        model(tokens, attention_mask=mask)
    with pytest.raises(ValueError, match="only 0"):
        model(tokens, attention_mask=torch.full(tokens.shape, 0.5))


def test_empty_and_misshapen_tokens(model):
    with pytest.raises(ValueError, match=r"shape \[batch, pos\]"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[batch, pos\]"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))


def test_bad_position_ids(model_pair):
    model = model_pair("tiny-gemma")[1]
    tokens, _ = batch("none", model.cfg.d_vocab)
    with pytest.raises(ValueError, match="position_ids must have shape"):
        model(tokens, position_ids=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="'arange', 'mask'"):
        model(tokens, position_ids="cumsum")


def test_fully_masked_rows_never_nan(model_pair):
    for name in ["tiny-bloom", "tiny-gemma2"]:
        model = model_pair(name)[1]
        tokens, _ = batch("none", model.cfg.d_vocab)
        with torch.no_grad():
            out = model(tokens, attention_mask=torch.zeros_like(tokens))
        assert torch.isfinite(out).all()


def test_unsupported_config_values_raise_not_implemented():
    from transformers import BloomConfig, Gemma3TextConfig, GemmaConfig

    from lens_det.config import LensConfig

    with pytest.raises(NotImplementedError, match="rope_type='yarn'"):
        LensConfig.from_hf_config(Gemma3TextConfig(num_hidden_layers=6,
                                                   rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(NotImplementedError, match="use_bidirectional_attention"):
        LensConfig.from_hf_config(Gemma3TextConfig(num_hidden_layers=2, use_bidirectional_attention=True))
    cfg = GemmaConfig(num_hidden_layers=2)
    cfg.hidden_size_per_layer_input = 256  # a Gemma 4 per-layer-embedding config
    with pytest.raises(NotImplementedError, match="hidden_size_per_layer_input"):
        LensConfig.from_hf_config(cfg)
    with pytest.raises(NotImplementedError, match="slow_but_exact"):
        LensConfig.from_hf_config(BloomConfig(pretraining_tp=2, slow_but_exact=True))
    with pytest.raises(NotImplementedError, match="model_type 'llama'"):
        from transformers import LlamaConfig

        LensConfig.from_hf_config(LlamaConfig())

