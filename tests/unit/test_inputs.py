"""Unit tests for lens_det.inputs (the argument checks forward, generate, parity and determinism share),
KVCache.check_compatible, and the old import paths of what moved out of lens_det.model.

Positions are integers, so every comparison is exact (torch.equal)."""

from __future__ import annotations

import pytest
import torch

import lens_det
from lens_det.components.positions import positions_from_mask
from lens_det.inputs import check_binary_mask, resolve_positions
from lens_det.parity.compare import prepare_inputs

LEFT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # a left-padded batch of two rows


def test_resolve_positions_each_spelling():
    # "mask": cumsum(mask) - 1 with pads at 0, of the new tokens only (the last n_new columns)
    assert torch.equal(resolve_positions("mask", LEFT, 0, 5, "rope"), positions_from_mask(LEFT))
    assert torch.equal(resolve_positions("mask", LEFT, 3, 2, "rope"), positions_from_mask(LEFT)[:, 3:])
    assert torch.equal(resolve_positions("mask", LEFT, 0, 5, "rope"), torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]))
    # None / "arange": no explicit positions (the caller builds arange from the cache offset); ALiBi: always none
    assert resolve_positions(None, LEFT, 0, 5, "rope") is None
    assert resolve_positions("arange", LEFT, 0, 5, "rope") is None
    assert resolve_positions(torch.zeros(7, 7), LEFT, 0, 5, "alibi") is None
    given = torch.arange(5)[None]
    assert resolve_positions(given, LEFT, 0, 5, "rope") is given


@pytest.mark.parametrize("bad, says", [(torch.arange(4)[None], r"\[2 or 1, 5\]"), (torch.arange(5), r"\[2 or 1, 5\]"),
                                       (torch.zeros(3, 5, dtype=torch.long), r"\[2 or 1, 5\]"),
                                       ("cumsum", "None, 'arange', 'mask' or a tensor")])
def test_resolve_positions_refuses_what_it_cannot_use(bad, says):
    with pytest.raises(ValueError, match=says):
        resolve_positions(bad, LEFT, 0, 5, "rope")


def test_check_binary_mask():
    check_binary_mask(LEFT)
    check_binary_mask(LEFT.bool())
    with pytest.raises(ValueError, match=r"only 0 \(pad\) and 1 \(real token\)"):
        check_binary_mask(LEFT * 2)


def test_model_and_parity_resolve_mask_positions_alike():
    """parity's prepare_inputs and the model's forward share resolve_positions: the positions the parity schedule runs
    are those the model's uncached forward uses for position_ids='mask' (exact: integers)."""
    model = lens_det.from_config("tiny-gemma3")
    tokens = torch.randint(3, model.cfg.d_vocab, LEFT.shape)
    _, _, positions, _ = prepare_inputs(model, tokens, LEFT, "mask", None, 5, 0, 1)
    seen = []
    model.blocks[0].attn.hook_rot_q.add_hook(lambda x, hook: seen.append(x))
    with torch.no_grad():
        model(tokens, attention_mask=LEFT, position_ids=positions)
        model(tokens, attention_mask=LEFT, position_ids="mask")
    model.reset_hooks()
    assert torch.equal(positions, positions_from_mask(LEFT))
    assert torch.equal(seen[0], seen[1])  # same RoPE rotation, so the same positions


def test_parity_prepare_refuses_a_non_binary_mask():
    model = lens_det.from_config("tiny-bloom")
    tokens = torch.randint(3, model.cfg.d_vocab, LEFT.shape)
    with pytest.raises(ValueError, match=r"only 0 \(pad\) and 1 \(real token\)"):
        prepare_inputs(model, tokens, LEFT * 2, None, None, 5, 0, 1)


def test_cache_check_compatible_refuses_what_the_forward_refuses():
    model = lens_det.from_config("tiny-gemma3")
    cache = model.new_cache(max_length=6)
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 4))
    with torch.no_grad():
        model(tokens, kv_cache=cache)
    cases = [((lens_det.from_config("tiny-gemma").config, 2, torch.float32, 1), "different config"),
             ((model.config, 3, torch.float32, 1), "batch size 3 but the cache holds batch size 2"),
             ((model.config, 2, torch.bfloat16, 1), "holds torch.float32 but the model runs in torch.bfloat16"),
             ((model.config, 2, torch.float32, 3), "holds 4 tokens and 3 more would exceed its max_length 6")]
    for args, says in cases:
        with pytest.raises(ValueError, match=says):
            cache.check_compatible(*args)
    cache.check_compatible(model.config, 2, torch.float32, 2)  # fits: no error
    with pytest.raises(ValueError, match="batch size 3 but the cache holds batch size 2"), torch.no_grad():
        model(torch.randint(3, model.cfg.d_vocab, (3, 1)), kv_cache=cache)
    assert cache.length == 4  # refused before any compute: the cache is unchanged


def test_old_import_paths_keep_working():
    import lens_det.model as model_module
    import lens_det.tl.weight_processing as moved
    import lens_det.weight_processing as old
    from lens_det.inputs import check_dtype
    from lens_det.kv_cache import KVCache
    from lens_det.tl.config_view import TLConfigView
    from lens_det.tl.tokens import TokensAndMask

    assert old.process_weights_ is moved.process_weights_ and old.STEPS is moved.STEPS
    assert model_module.RuntimeConfig is TLConfigView and model_module.TokensAndMask is TokensAndMask
    assert model_module.check_dtype is check_dtype
    assert KVCache._commit is KVCache.commit and KVCache._discard is KVCache.discard
