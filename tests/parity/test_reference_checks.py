"""compare() checks its reference before comparing (attention implementation, dtype, eval mode, weights), each with
a message naming the cause instead of a FAIL at some layer; and it compares against HF sdpa, bit for bit."""

import json
import warnings

import pytest
import torch
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import lens_det
from lens_det.components.attention import SDPA_PATTERN_FALLBACK
from lens_det.parity import capture_reference, compare
from lens_det.parity.models import random_hf_model
from tests.helpers import batch


def pair(name, dtype=torch.float32, attn="eager"):
    """A fresh (hf, lens_det) pair both running `attn` (fresh: the tests below edit or retrain them)."""
    hf = random_hf_model(name, dtype, attn_implementation=attn)
    model = lens_det.from_hf_model(hf)
    model.attn_implementation = attn  # from_hf_model follows the HF model's (once it does: a no-op)
    return hf, model


@pytest.fixture
def no_compute(monkeypatch):
    """Fail if compare runs either model: the checks come before any compute."""
    def refuse(model, hf):
        monkeypatch.setattr(model, "run_with_cache", lambda *a, **k: pytest.fail("lens_det ran before the check"))
        monkeypatch.setattr(hf, "forward", lambda *a, **k: pytest.fail("HF ran before the check"))
    return refuse


def test_hf_sdpa_against_lens_det_eager_is_refused(no_compute):
    hf, model = pair("tiny-gemma3", attn="sdpa")
    model.attn_implementation = "eager"
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    no_compute(model, hf)
    with pytest.raises(ValueError, match=r"HF model runs attn_implementation='sdpa' and the lens_det model 'eager'"
                                         r".*set model.attn_implementation = 'sdpa'.*attn_implementation='eager'"):
        compare(model, hf, tokens, mask)


def test_hf_eager_against_lens_det_sdpa_is_refused(no_compute):
    hf, model = pair("tiny-gemma4-ple")
    model.attn_implementation = "sdpa"
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    no_compute(model, hf)
    with pytest.raises(ValueError, match=r"HF model runs attn_implementation='eager' and the lens_det model 'sdpa'"
                                         r".*set model.attn_implementation = 'eager'.*attn_implementation='sdpa'"):
        compare(model, hf, tokens, mask)


def test_dtype_mismatch_is_refused(no_compute):
    hf = random_hf_model("tiny-gemma", torch.bfloat16)
    model = lens_det.from_hf_model(hf, dtype=torch.float32)
    tokens, mask = batch("none", model.cfg.d_vocab, length=8)
    no_compute(model, hf)
    with pytest.raises(ValueError, match=r"HF model's parameters are torch.bfloat16 and the lens_det model's "
                                         r"torch.float32.*lens_det.from_hf_model\(hf_model\)"):
        compare(model, hf, tokens, mask)


def test_hf_model_in_training_mode_is_refused(no_compute):
    hf, model = pair("tiny-gemma")
    hf.train()
    tokens, mask = batch("none", model.cfg.d_vocab, length=8)
    no_compute(model, hf)
    with pytest.raises(ValueError, match=r"training mode.*dropout.*hf_model.eval\(\)"):
        compare(model, hf, tokens, mask)


@pytest.mark.parametrize("side", ["lens_det", "hf"])
def test_different_weights_are_refused_naming_the_parameter(no_compute, side):
    hf, model = pair("tiny-gemma")
    with torch.no_grad():
        if side == "lens_det":
            model.blocks[1].mlp.w_in[0, 0] += 0.5
        else:
            hf.model.layers[1].self_attn.o_proj.weight[0, 0] += 0.5
    tokens, mask = batch("none", model.cfg.d_vocab, length=8)
    no_compute(model, hf)
    name = "blocks.1.mlp.w_in" if side == "lens_det" else "blocks.1.attn.w_o"
    with pytest.raises(ValueError, match=rf"weights differ from the HF model's \(first differing parameter: "
                                         rf"{name}, max \|diff\| 0.5\).*from_hf_model"):
        compare(model, hf, tokens, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma4-ple"])
def test_compare_under_sdpa_is_bit_identical(name, dtype, tmp_path):
    """Every hook point lens_det has under sdpa equals HF sdpa's, uncached and cached, on a left-padded batch; the
    pattern hooks are listed as not compared, never requested (which would run those layers eagerly)."""
    hf, model = pair(name, dtype, attn="sdpa")
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.set_use_split_qkv_input(True)
    tokens, mask = batch("left", model.cfg.d_vocab)
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compare(model, hf, tokens, mask, lens_det.positions_from_mask(mask), prefill=5, chunk=3)
    assert not [w for w in caught if str(w.message) == SDPA_PATTERN_FALLBACK]  # no layer fell back to eager
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == before  # the recorder is gone
    assert report.passed and report.coverage == 1.0 and report.max_abs() == 0.0, report.to_text()
    assert report.attn_implementation == "sdpa" and "sdpa" in report.title
    n = model.cfg.n_layers
    patterns = {f"blocks.{i}.attn.hook_{k}" for i in range(n) for k in ("attn_scores", "pattern")}
    assert set(report.not_compared) == patterns
    assert report.not_compared["blocks.0.attn.hook_pattern"] == \
        "sdpa computes no attention pattern (a hook on it runs that layer eagerly)"
    compared = {r.hook for r in report.rows}
    assert not compared & patterns
    assert {f"blocks.{n - 1}.attn.hook_rot_q", f"blocks.{n - 1}.attn.hook_z", "blocks.0.attn.hook_rot_k"} <= compared
    assert report.n_hooks == len(model.hook_dict) - n - len(patterns)  # all but hook_attn_in and the patterns
    assert {r.step for r in report.rows} == {"uncached", "cached:0", "cached:1", "cached:2", "cached:3"}
    text = report.to_text()
    assert "attention: sdpa" in text and "sdpa computes no attention pattern" in text and "PASS" in text
    report.save_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["attn_implementation"] == "sdpa" and data["not_compared"] == report.not_compared


@pytest.mark.parametrize("name", ["tiny-gemma", "tiny-gemma4-ple"])
def test_sdpa_reference_logits_are_hf_sdpa_logits(name):
    """capture_reference under sdpa runs what a plain HF sdpa forward runs (its masks, is_causal skips, KV-sharing
    cut): the logits are bit-identical, uncached and on each cached step; it records the rotated q/k and no
    pattern."""
    hf = random_hf_model(name, attn_implementation="sdpa")
    cfg = lens_det.from_hf_model(hf).config
    tokens, mask = batch("left", cfg.d_vocab)
    pos = lens_det.positions_from_mask(mask)
    with torch.no_grad():
        plain = hf(tokens, attention_mask=mask, position_ids=pos, use_cache=False).logits
    logits, values = capture_reference(hf, cfg, tokens, mask, pos)
    assert torch.equal(logits, plain)
    assert "blocks.0.attn.hook_rot_q" in values and "blocks.0.attn.hook_rot_k" in values
    assert not [k for k in values if k.endswith(("hook_attn_scores", "hook_pattern"))]
    ours, theirs = DynamicCache(config=hf.config), DynamicCache(config=hf.config)
    for a, b in [(0, 5), (5, 6), (6, 9), (9, 16)]:
        with torch.no_grad():
            plain = hf(tokens[:, a:b], attention_mask=mask[:, :b], position_ids=pos[:, a:b], past_key_values=theirs,
                       use_cache=True).logits
        logits, _ = capture_reference(hf, cfg, tokens[:, a:b], mask[:, :b], pos[:, a:b], past_key_values=ours)
        assert torch.equal(logits, plain), (a, b)


def test_cli_parity_with_sdpa(capsys):
    from lens_det.cli import main

    assert main(["parity", "--model", "tiny-gemma", "--dtype", "float32", "--attn-implementation", "sdpa",
                 "--length", "10"]) == 0
    out = capsys.readouterr().out
    assert "(sdpa attention)" in out and "PASS" in out and "hook_pattern are not compared" in out
    with pytest.raises(SystemExit, match=r"sdpa is not available for tiny-gemma2 .*eager attention only"):
        main(["parity", "--model", "tiny-gemma2", "--attn-implementation", "sdpa"])


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma4-ple"])
def test_a_config_built_model_and_its_saved_copy_compare(name, tmp_path):
    """An HF model built from a config without `architectures` (as AutoConfig.for_model or a config class makes
    it), saved and reloaded: save_pretrained fills in `architectures` (in the saved file and on the model's own
    config), from_pretrained sets `_name_or_path`. Bookkeeping: the two models are the same model, bit for bit,
    whichever one lens_det was converted from (tolerance 0: same weights, same ops)."""
    from transformers import AutoModelForCausalLM

    from lens_det.config import hf_config_from_name
    from lens_det.parity.models import random_hf_model_from_config

    config = hf_config_from_name(name)
    config.architectures = None
    hf = random_hf_model_from_config(config)
    model = lens_det.from_hf_model(hf)
    hf.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=hf.config._attn_implementation)
    assert reloaded.config.architectures and model.config.hf_architecture is None  # what used to be refused
    tokens, mask = batch("left", model.cfg.d_vocab, length=8)
    for ours, theirs in [(model, reloaded), (model, hf), (lens_det.from_hf_model(reloaded), hf)]:
        report = compare(ours, theirs, tokens, mask, prefill=5)
        assert report.passed and report.max_abs() == 0.0, report.to_text()


def test_a_different_converted_config_is_still_refused_naming_the_field(no_compute):
    """Only bookkeeping is ignored: a config field that changes the conversion (here the final soft-cap) refuses,
    naming that field and no bookkeeping one."""
    hf, model = pair("tiny-gemma2")
    hf.config.final_logit_softcapping = 2 * hf.config.final_logit_softcapping
    hf.config.architectures = None
    tokens, mask = batch("none", model.cfg.d_vocab, length=8)
    no_compute(model, hf)
    with pytest.raises(ValueError, match=r"different architecture or vocabulary than the lens_det model: "
                                         r"\{'final_softcap': \(8\.0, 16\.0\)\} \(lens_det's value, the HF "
                                         r"model's\); .*lens_det.from_hf_model\(hf_model\)"):
        compare(model, hf, tokens, mask)
