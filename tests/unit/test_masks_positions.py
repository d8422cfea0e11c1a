"""Unit tests for the attention masks (components/masks.py, components/context.py) and the positional mechanisms
(components/positions.py): each builder against transformers' own function on the same inputs (tolerance 0.0: the
parity contract), and against a definition written out here (a Python loop, or float64 math with a stated
tolerance)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GemmaConfig
from transformers import masking_utils as hf_masks
from transformers.generation.utils import GenerationMixin
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor
from transformers.models.gemma.modeling_gemma import GemmaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.gemma.modeling_gemma import rotate_half as hf_rotate_half

from lens_det.components.context import ForwardContext
from lens_det.components.masks import additive_mask
from lens_det.components.positions import (alibi_bias, alibi_slopes, apply_rope, positions_from_mask, rope_cos_sin,
                                           rope_inv_freq, rotate_half)

L = 10
MASKS = {  # [3, L] 0/1 masks: no padding, left padding, right padding, pads inside a row, a row of pads only
    "none": torch.ones(3, L, dtype=torch.long),
    "left": torch.tensor([[0] * 4 + [1] * 6, [0] + [1] * 9, [1] * 10]),
    "right": torch.tensor([[1] * 7 + [0] * 3, [1] * 10, [1] * 9 + [0]]),
    "inner": torch.tensor([[1, 1, 0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 1, 1, 0, 1, 1], [1] * 10]),
    "empty_row": torch.tensor([[0] * 10, [1] * 10, [0] * 5 + [1] * 5]),
}
W = 4  # sliding window
# (query_start, n_query, key_start, n_key, window): a forward's query rows and the keys its layer attends to,
# as the model asks for them (with a KV cache a sliding layer holds W - 1 positions, so key_start > 0).
GEOMETRIES = {
    "prefill": (0, L, 0, L, None),
    "prefill_sliding": (0, L, 0, L, W),
    "decode": (L - 1, 1, 0, L, None),
    "chunk_after_cache": (6, 4, 0, L, None),
    "decode_sliding_trimmed": (L - 1, 1, L - W, W, W),
    "chunk_sliding_trimmed": (7, 3, 7 - (W - 1), W - 1 + 3, W),
}


def _mask_function(window):
    return hf_masks.causal_mask_function if window is None else hf_masks.sliding_window_causal_mask_function(window)


def _context(mask, query_start, n_query, dtype=torch.float32, position_ids=None):
    return ForwardContext(mask=mask, query_start=query_start, n_query=n_query, dtype=dtype, position_ids=position_ids)


# --------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", MASKS)
def test_additive_mask_is_hf_eager_mask(kind, geometry, dtype):
    """additive_mask equals transformers.masking_utils.eager_mask (what HF's eager layers add to the scores) with
    the same offsets, lengths, window and padding mask. Tolerance 0.0."""
    mask = MASKS[kind]
    query_start, n_query, key_start, n_key, window = GEOMETRIES[geometry]
    ours = additive_mask(mask, query_start, n_query, key_start, n_key, window, dtype)
    theirs = hf_masks.eager_mask(batch_size=mask.shape[0], q_length=n_query, kv_length=n_key, q_offset=query_start,
                                 kv_offset=key_start, mask_function=_mask_function(window),
                                 attention_mask=mask.bool(), dtype=dtype)
    assert ours.dtype == theirs.dtype == dtype and torch.equal(ours, theirs)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_additive_mask_matches_its_definition(geometry):
    """additive_mask against a loop over its docstring's rule: query row r is absolute index i = query_start + r,
    key column c is j = key_start + c; allowed iff j <= i, (sliding) j > i - window, and mask[b, j]. Allowed
    entries are 0.0, the others finfo.min, never -inf (tolerance 0.0)."""
    mask = MASKS["inner"]
    query_start, n_query, key_start, n_key, window = GEOMETRIES[geometry]
    ours = additive_mask(mask, query_start, n_query, key_start, n_key, window, torch.float32)
    assert ours.shape == (3, 1, n_query, n_key)
    low = torch.finfo(torch.float32).min
    for b in range(3):
        for r in range(n_query):
            for c in range(n_key):
                i, j = query_start + r, key_start + c
                allowed = j <= i and (window is None or j > i - window) and bool(mask[b, j])
                assert ours[b, 0, r, c].item() == (0.0 if allowed else low), (b, r, c)
    assert not torch.isinf(ours).any()


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_context_masks_are_memoised_and_rows_slice_the_full_mask(geometry):
    """ForwardContext.additive_mask is additive_mask (memoised: the same tensor for a second layer), and
    additive_mask_rows for each query chunk equals those rows of it (tolerance 0.0)."""
    mask = MASKS["left"]
    query_start, n_query, key_start, n_key, window = GEOMETRIES[geometry]
    ctx = _context(mask, query_start, n_query, torch.bfloat16)
    full = ctx.additive_mask(key_start, n_key, window, "cpu")
    assert torch.equal(full, additive_mask(mask, query_start, n_query, key_start, n_key, window, torch.bfloat16))
    assert ctx.additive_mask(key_start, n_key, window, "cpu") is full
    for chunk in (1, 3):
        for start in range(0, n_query, chunk):
            rows = slice(start, min(start + chunk, n_query))
            assert torch.equal(ctx.additive_mask_rows(key_start, n_key, window, "cpu", rows), full[:, :, rows])


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", MASKS)
def test_sdpa_mask_is_hf_sdpa_mask_and_agrees_with_the_eager_mask(kind, geometry):
    """ForwardContext.sdpa_mask equals transformers' sdpa_mask called as create_causal_mask /
    create_sliding_window_causal_mask call it (tolerance 0.0, None included). Where it is a tensor it allows
    exactly what the eager mask allows; where it is None (HF relies on sdpa's is_causal) the eager mask must be
    the plain causal pattern that is_causal applies: lower triangle when q == K, everything when q == 1."""
    mask = MASKS[kind]
    query_start, n_query, key_start, n_key, window = GEOMETRIES[geometry]
    ours = _context(mask, query_start, n_query).sdpa_mask(key_start, n_key, window, "cpu")
    theirs = hf_masks.sdpa_mask(batch_size=3, q_length=n_query, kv_length=n_key, q_offset=query_start,
                                kv_offset=key_start, mask_function=_mask_function(window),
                                attention_mask=mask.bool(), local_size=window, allow_is_causal_skip=True)
    assert (ours is None) == (theirs is None)
    eager_allows = additive_mask(mask, query_start, n_query, key_start, n_key, window, torch.float32) == 0
    if ours is None:
        causal = torch.ones(n_query, n_key, dtype=torch.bool)
        if n_query > 1:
            causal = causal.tril()
        assert torch.equal(eager_allows, causal.expand(3, 1, n_query, n_key))
    else:
        assert ours.dtype == torch.bool and torch.equal(ours, theirs)
        assert torch.equal(ours, eager_allows)


def test_sdpa_mask_is_none_only_where_hf_skips_it():
    """The None cases of HF's _ignore_causal_mask_sdpa, on concrete inputs: no padding with q == K or q == 1 and
    (sliding) fewer keys than the window give None; padding in view, or a sliding layer with K >= window, give a
    tensor."""
    none, left = MASKS["none"], MASKS["left"]
    assert _context(none, 0, L).sdpa_mask(0, L, None, "cpu") is None
    assert _context(none, L - 1, 1).sdpa_mask(0, L, None, "cpu") is None
    assert _context(none, 0, W - 1).sdpa_mask(0, W - 1, W, "cpu") is None  # sliding, K < window
    assert _context(none, 0, L).sdpa_mask(0, L, W, "cpu") is not None  # sliding, K >= window
    assert _context(left, 0, L).sdpa_mask(0, L, None, "cpu") is not None
    assert _context(none, 6, 4).sdpa_mask(0, L, None, "cpu") is not None  # 4 queries over 10 keys
    assert _context(left, L - 1, 1).sdpa_mask(6, 4, None, "cpu") is None  # the pads are out of view


@pytest.mark.parametrize("kind", ["none", "left"])
def test_keep_last_context_slices_the_full_contexts_masks(kind):
    """keep_last(k) (HF's _maybe_slice_kv_shared_inputs): the last k query rows of the same keys. Its sdpa mask is
    the full-length context's, sliced (None stays None, as HF slices the masks built for all positions); its
    eager mask and position ids are the full ones' last k rows (tolerance 0.0)."""
    mask, k = MASKS[kind], 3
    positions = positions_from_mask(mask)
    ctx = _context(mask, 0, L, position_ids=positions)
    kept = ctx.keep_last(k)
    assert (kept.query_start, kept.n_query) == (L - k, k) and kept.rows_of is ctx
    assert kept.keep_last(1).rows_of is ctx  # slicing a slice still refers to the full-length context
    assert torch.equal(kept.position_ids, positions[:, -k:])
    for window in (None, W):
        full = ctx.sdpa_mask(0, L, window, "cpu")
        sliced = kept.sdpa_mask(0, L, window, "cpu")
        assert sliced is None if full is None else torch.equal(sliced, full[:, :, -k:])
        assert torch.equal(kept.additive_mask(0, L, window, "cpu"), ctx.additive_mask(0, L, window, "cpu")[:, :, -k:])


@pytest.mark.parametrize("kind", MASKS)
def test_key_positions_count_real_tokens(kind):
    """key_positions: each key's index among its row's real tokens, -1 for pads (a loop over the mask), sliced at
    key_start (tolerance 0.0)."""
    mask = MASKS[kind]
    expected = torch.full(mask.shape, -1)
    for b in range(mask.shape[0]):
        seen = 0
        for j in range(L):
            if mask[b, j]:
                expected[b, j], seen = seen, seen + 1
    ctx = _context(mask, 0, L)
    assert torch.equal(ctx.key_positions(0, L, "cpu"), expected)
    assert torch.equal(ctx.key_positions(3, 5, "cpu"), expected[:, 3:8])


# --------------------------------------------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------------------------------------------

HEAD_COUNTS = list(range(1, 18)) + [24, 48, 112]  # powers of two and not (Bloom-560m has 16, bloom-7b1 32, 176b 112)


@pytest.mark.parametrize("n_heads", HEAD_COUNTS)
def test_alibi_slopes_are_hf_bloom_slopes(n_heads):
    """Tolerance 0.0 against HF Bloom's _get_alibi_slopes. Against the ALiBi paper's closed form in float64:
    slope_i = 2^(-8 i / c) for the c = 2^floor(log2 n) first heads, then 2^(-4 (2 i - 1) / c) for the rest; the
    fp32 base is rounded once (2^-24 relative) and raised to the power p <= 2c - 1, so rtol = 2c * 2^-24."""
    slopes = alibi_slopes(n_heads)
    assert slopes.dtype == torch.float32 and torch.equal(slopes, _get_alibi_slopes(n_heads, torch.device("cpu")))
    c = 2 ** math.floor(math.log2(n_heads))
    exact = [2 ** (-8 * i / c) for i in range(1, c + 1)]
    exact += [2 ** (-4 * (2 * i - 1) / c) for i in range(1, n_heads - c + 1)]
    torch.testing.assert_close(slopes.double(), torch.tensor(exact, dtype=torch.float64), rtol=2 * c * 2**-24, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n_heads", [3, 4, 6])
@pytest.mark.parametrize("kind", MASKS)
def test_alibi_bias_is_hf_build_alibi_tensor(kind, n_heads, dtype):
    """alibi_bias and ForwardContext.alibi (sliced at key_start) against HF Bloom's build_alibi_tensor on the same
    mask. Tolerance 0.0."""
    mask = MASKS[kind]
    theirs = build_alibi_tensor(mask, n_heads, dtype)
    ours = alibi_bias(mask, alibi_slopes(n_heads), dtype)
    assert ours.shape == (3 * n_heads, 1, L) and torch.equal(ours, theirs)
    ctx = _context(mask, L - 1, 1, dtype)
    assert torch.equal(ctx.alibi(alibi_slopes(n_heads), 0, "cpu"), theirs)
    assert torch.equal(ctx.alibi(alibi_slopes(n_heads), 6, "cpu"), theirs[..., 6:])


# --------------------------------------------------------------------------------------------------------------
# Positions from the mask
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", MASKS)
def test_positions_from_mask_are_hf_generates(kind):
    """positions_from_mask against GenerationMixin._prepare_position_ids_for_generation (cumsum(mask) - 1, pads
    at 0) on the same mask. Tolerance 0.0."""
    mask = MASKS[kind]
    inputs = {"attention_mask": mask}  # the method reads `self` only when there is no attention mask
    theirs = GenerationMixin._prepare_position_ids_for_generation(None, torch.zeros_like(mask), inputs)
    assert torch.equal(positions_from_mask(mask), theirs)
    assert torch.equal(positions_from_mask(mask.bool()), theirs)  # a boolean mask gives the same ids


# --------------------------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------------------------

def _gemma_config(rope_parameters, head_dim=32):
    return GemmaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim, rope_parameters=rope_parameters)


ROPE_TYPES = {
    # name: (HF rope_parameters, lens_det rope_inv_freq arguments after d_head)
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, (10000.0, 1.0, 1.0)),
    "linear x8": ({"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}, (1e6, 8.0, 1.0)),
    "proportional 0.25": ({"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
                          (1e6, 1.0, 0.25)),
}


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_rope_inv_freq_is_hfs(rope_type):
    """rope_inv_freq against HF's init function of that rope type (tolerance 0.0), and against float64
    1 / theta^(2i / d) / factor for the rotated pairs, zeros for the rest (rtol 1e-6: fp32 pow and a division,
    a few ulp)."""
    params, args = ROPE_TYPES[rope_type]
    config = _gemma_config(params)
    if params["rope_type"] == "default":
        theirs, _ = GemmaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, "cpu")
    ours = rope_inv_freq(32, *args)
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    theta, factor, fraction = args
    n_rotated = int(fraction * 32 // 2)
    exact = [theta ** (-2 * i / 32) / factor for i in range(n_rotated)] + [0.0] * (16 - n_rotated)
    torch.testing.assert_close(ours.double(), torch.tensor(exact, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rope_type", ["default", "linear x8"])
def test_rope_cos_sin_are_hf_rotary_embedding(rope_type, dtype):
    """rope_cos_sin against GemmaRotaryEmbedding.forward on mask-derived position ids.
    Tolerance 0.0. Against float64 cos/sin of position * inv_freq: the fp32 product is rounded once
    (|angle| < 10 * 1 rad here, error < 10 * 2^-24) and cos/sin add a few ulp: atol 2e-6 in fp32."""
    params, args = ROPE_TYPES[rope_type]
    emb = GemmaRotaryEmbedding(_gemma_config(params))
    positions = positions_from_mask(MASKS["inner"])
    inv_freq = rope_inv_freq(32, *args)
    theirs = emb(torch.zeros(1, dtype=dtype), positions)
    ours = rope_cos_sin(positions, inv_freq, dtype)
    assert ours[0].shape == (3, L, 32) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    if dtype == torch.float32:
        angles = positions[..., None].double() * inv_freq.double()
        angles = torch.cat([angles, angles], dim=-1)
        torch.testing.assert_close(ours[0].double(), angles.cos(), rtol=0, atol=2e-6)
        torch.testing.assert_close(ours[1].double(), angles.sin(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_apply_rope_is_hfs_rotate_half_formula(dtype):
    """apply_rope and rotate_half against HF Gemma's apply_rotary_pos_emb / rotate_half. Tolerance 0.0."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, L, 32, generator=gen).to(dtype)
    cos, sin = rope_cos_sin(positions_from_mask(MASKS["left"]), rope_inv_freq(32, 10000.0, 1.0), dtype)
    assert torch.equal(rotate_half(x), hf_rotate_half(x))
    assert torch.equal(apply_rope(x, cos, sin), apply_rotary_pos_emb(x, x, cos, sin)[0])


def test_apply_rope_rotates_each_half_split_pair_float64():
    """Against the rotation it means, in float64: pair (x_i, x_{i+d/2}) is turned by angle p * inv_freq_i, on the
    same fp32 cos/sin tables (so only apply_rope's two products and one add are rounded: rtol/atol 1e-6). Rotations
    keep each pair's length (same tolerance). With proportional RoPE the unrotated pairs (inv_freq 0: cos 1, sin 0)
    pass bit for bit (tolerance 0.0)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, L, 32, generator=gen)
    positions = positions_from_mask(MASKS["inner"])
    cos, sin = rope_cos_sin(positions, rope_inv_freq(32, 10000.0, 1.0), torch.float32)
    c, s, xd = cos[:, None, :, :16].double(), sin[:, None, :, :16].double(), x.double()
    first = xd[..., :16] * c - xd[..., 16:] * s
    second = xd[..., 16:] * c + xd[..., :16] * s
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out.double(), torch.cat([first, second], dim=-1), rtol=1e-6, atol=1e-6)
    pair_len = lambda t: t[..., :16] ** 2 + t[..., 16:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_len(out.double()), pair_len(xd), rtol=1e-5, atol=1e-5)
    cos_p, sin_p = rope_cos_sin(positions, rope_inv_freq(32, 1e6, 1.0, 0.25), torch.float32)
    out_p = apply_rope(x, cos_p, sin_p)
    unrotated = torch.cat([torch.arange(4, 16), torch.arange(20, 32)])  # 4 of 16 pairs rotate: dims 0-3, 16-19
    assert torch.equal(out_p[..., unrotated], x[..., unrotated])
