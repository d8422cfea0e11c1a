"""attn_implementation="sdpa": bit for bit with HF sdpa (tolerance 0.0), and what sdpa changes about hooks.

Tolerance 0.0 throughout: lens_det makes HF's own sdpa call (transformers' sdpa_attention_forward, with the mask
transformers' sdpa_mask builds from the same offsets, lengths, window and padding), on tensors produced by the
same ops as HF's, so there is no rounding difference to allow for.
"""

import pytest
import torch
from transformers import DynamicCache

import lens_det
from lens_det.parity.models import random_hf_model
from tests.helpers import DTYPES, batch

SDPA = ["tiny-gemma", "tiny-gemma3", "tiny-gemma4", "tiny-gemma4-ple", "tiny-gemma4-moe"]
PATTERN = ("hook_attn_scores", "hook_pattern")
EAGER_ONLY = ["tiny-bloom", "tiny-gemma2", "tiny-vaultgemma"]
SCHEDULES = {"5+1x11": [(0, 5)] + [(i, i + 1) for i in range(5, 16)],
             "1x16": [(i, i + 1) for i in range(16)],
             "3+chunks": [(0, 3), (3, 7), (7, 8), (8, 15), (15, 16)]}


@pytest.fixture(scope="module")
def sdpa_pair():
    built = {}

    def get(name, dtype=torch.float32):
        if (name, dtype) not in built:
            hf = random_hf_model(name, dtype, attn_implementation="sdpa")
            built[(name, dtype)] = (hf, lens_det.from_hf_model(hf))
        return built[(name, dtype)]

    return get


def test_from_hf_model_follows_the_hf_model(sdpa_pair):
    hf, model = sdpa_pair("tiny-gemma3")
    assert hf.config._attn_implementation == "sdpa" and model.attn_implementation == "sdpa"
    eager = lens_det.from_hf_model(random_hf_model("tiny-gemma3"))
    assert eager.attn_implementation == "eager"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["none", "left", "right"])
@pytest.mark.parametrize("name", SDPA)
def test_uncached_logits_and_hooks_equal_hf_sdpa(sdpa_pair, name, kind, dtype):
    hf, model = sdpa_pair(name, dtype)
    tokens, mask = batch(kind, model.cfg.d_vocab)
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, use_cache=False, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens, attention_mask=mask,
                                             names_filter=lambda n: n.endswith("hook_resid_post"))
    assert torch.equal(logits, ref.logits)
    for i in range(model.cfg.n_layers - 1):  # HF's last hidden state is after the final norm
        assert torch.equal(cache[f"blocks.{i}.hook_resid_post"], ref.hidden_states[i + 1]), i


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", SDPA)
def test_cached_schedules_equal_hf_sdpa(sdpa_pair, name, schedule, dtype):
    """Left padding and mask-derived positions (HF generate's), on several chunkings of prefill and decode."""
    hf, model = sdpa_pair(name, dtype)
    tokens, mask = batch("left", model.cfg.d_vocab)
    positions = lens_det.positions_from_mask(mask)
    cache, hf_cache = model.new_cache(), DynamicCache(config=hf.config)
    with torch.no_grad():
        for a, b in SCHEDULES[schedule]:
            ref = hf(tokens[:, a:b], attention_mask=mask[:, :b], position_ids=positions[:, a:b],
                     past_key_values=hf_cache, use_cache=True).logits
            ours = model(tokens[:, a:b], attention_mask=mask[:, :b], position_ids=positions[:, a:b], kv_cache=cache)
            assert torch.equal(ours, ref), (a, b)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SDPA)
def test_greedy_generate_equals_hf_generate(sdpa_pair, name, dtype, use_cache):
    hf, model = sdpa_pair(name, dtype)
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    with torch.no_grad():
        ref = hf.generate(tokens, attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=use_cache,
                          output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    out = model.generate(tokens, mask, max_new_tokens=10, stop_tokens=[], use_kv_cache=use_cache)
    assert torch.equal(out.tokens, ref.sequences)
    assert len(out.logits) == len(ref.logits) == 10
    for ours, theirs in zip(out.logits, ref.logits):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma3"])
def test_sdpa_and_eager_really_differ(sdpa_pair, name):
    """The two implementations are different computations, so the tests above can tell them apart: on a
    left-padded batch the fully masked pad rows differ by O(1) (eager attends uniformly to every key, sdpa returns
    zeros there), while real tokens agree to fp32 rounding (stated bound 1e-4 of the logit scale)."""
    hf, model = sdpa_pair(name)
    tokens, mask = batch("left", model.cfg.d_vocab)
    with torch.no_grad():
        sdpa = model(tokens, attention_mask=mask)
        model.attn_implementation = "eager"
        try:
            eager = model(tokens, attention_mask=mask)
        finally:
            model.attn_implementation = "sdpa"
    real, pad = mask.bool(), ~mask.bool()
    assert (sdpa[pad] - eager[pad]).abs().max() > 1e-2
    assert (sdpa[real] - eager[real]).abs().max() <= 1e-4 * eager[real].abs().max()


def test_runtime_switch_and_refusals(sdpa_pair):
    _, model = sdpa_pair("tiny-gemma3")
    with pytest.raises(ValueError, match="must be one of"):
        model.attn_implementation = "flash_attention_2"
    for name in EAGER_ONLY:
        eager_only = lens_det.from_hf_model(random_hf_model(name))
        with pytest.raises(ValueError, match="not available for this model.*eager"):
            eager_only.attn_implementation = "sdpa"
        assert eager_only.attn_implementation == "eager"


def test_every_hook_but_the_pattern_fires_as_under_eager(sdpa_pair):
    hf, model = sdpa_pair("tiny-gemma4-ple")
    tokens, mask = batch("left", model.cfg.d_vocab)
    pattern = PATTERN
    with torch.no_grad():
        _, sdpa = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: not n.endswith(pattern))
        eager_model = lens_det.from_hf_model(random_hf_model("tiny-gemma4-ple"))
        _, eager = eager_model.run_with_cache(tokens, attention_mask=mask)
    assert set(sdpa.keys()) == {k for k in eager.keys() if not k.endswith(pattern)}
    for key in sdpa.keys():  # before the first attention core the two implementations compute the same thing
        if key.startswith(("hook_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.", "blocks.0.attn.hook_q",
                           "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_rot")):
            assert torch.equal(sdpa[key], eager[key]), key


def test_a_pattern_hook_runs_that_layer_eagerly(sdpa_pair):
    """Hooking hook_pattern of layer 1 makes that layer (and only it) compute eager attention for the call: its
    pattern is the one behind its output, its hook_z equals the eager model's given the same input, the other
    layers stay sdpa-exact, and a warning says so."""
    hf, model = sdpa_pair("tiny-gemma3")
    tokens, mask = batch("left", model.cfg.d_vocab)
    eager = lens_det.from_hf_model(random_hf_model("tiny-gemma3"))
    with torch.no_grad():
        _, plain = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: not n.endswith(PATTERN))
        with pytest.warns(UserWarning, match="ran eager attention"):
            _, hooked = model.run_with_cache(
                tokens, attention_mask=mask,
                names_filter=lambda n: not n.endswith(PATTERN) or n.startswith("blocks.1."))
        # eager from layer 1's input on: start the eager model at layer 1 with the sdpa model's residual
        _, eager_l1 = eager.run_with_cache(hooked["blocks.1.hook_resid_pre"], start_at_layer=1, attention_mask=mask,
                                           stop_at_layer=2)
    assert "blocks.1.attn.hook_pattern" in hooked and "blocks.0.attn.hook_pattern" not in hooked
    assert torch.equal(hooked["blocks.0.attn.hook_z"], plain["blocks.0.attn.hook_z"])  # layer 0: still sdpa
    assert torch.equal(hooked["blocks.1.attn.hook_pattern"], eager_l1["blocks.1.attn.hook_pattern"])
    assert torch.equal(hooked["blocks.1.attn.hook_z"], eager_l1["blocks.1.attn.hook_z"])
    assert not torch.equal(hooked["blocks.1.attn.hook_z"], plain["blocks.1.attn.hook_z"])  # pad rows differ
    assert model.attn_implementation == "sdpa" and not model.blocks[1].attn.hook_pattern._forward_hooks


def test_deterministic_mode_ignores_the_implementation(sdpa_pair):
    """Deterministic mode runs its own batch-invariant eager ops under either implementation."""
    _, model = sdpa_pair("tiny-gemma3")
    eager = lens_det.from_hf_model(random_hf_model("tiny-gemma3"))
    tokens, mask = batch("left", model.cfg.d_vocab)
    with torch.no_grad(), lens_det.deterministic():
        assert torch.equal(model(tokens, attention_mask=mask), eager(tokens, attention_mask=mask))


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("kind", ["none", "left"])
def test_kv_sharing_tail_cut_follows_hf_under_sdpa(sdpa_pair, kind, keep):
    """Gemma 4 E2B-style KV sharing with logits_to_keep: HF runs the KV-sharing layers on the kept positions only,
    except under sdpa with more than one kept position while a layer type's mask is None (no padding: sdpa's
    is_causal could not see the dropped queries); lens_det makes the same choice, uncached and after a prefill."""
    hf, model = sdpa_pair("tiny-gemma4-ple")
    tokens, mask = batch(kind, model.cfg.d_vocab)
    seen = []
    last = model.cfg.n_layers - 1  # a KV-sharing consumer layer
    hook = (f"blocks.{last}.hook_resid_post", lambda x, hook: seen.append(x.shape[1]))
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        ours = model.run_with_hooks(tokens, attention_mask=mask, logits_to_keep=keep, fwd_hooks=[hook])
        assert torch.equal(ours, ref)
        cache, hf_cache = model.new_cache(), DynamicCache(config=hf.config)
        hf(tokens[:, :6], attention_mask=mask[:, :6], past_key_values=hf_cache, use_cache=True)
        model(tokens[:, :6], attention_mask=mask[:, :6], kv_cache=cache)
        ref = hf(tokens[:, 6:], attention_mask=mask, past_key_values=hf_cache, use_cache=True,
                 logits_to_keep=keep).logits
        assert torch.equal(model(tokens[:, 6:], attention_mask=mask, kv_cache=cache, logits_to_keep=keep), ref)
    cut = keep == 1 or kind == "left"  # with padding both layer types have a mask, so HF cuts
    assert seen == [keep if cut else tokens.shape[1]]
