"""Bad input, as a table: each call raises the stated error type with a message that names the fix, and a KV
cache it was given is left exactly as it was (keys, values, offsets and mask, bit for bit). Also the former
silent-wrong cases: each now matches HF or is refused."""

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification

import lens_det
from lens_det.cli import main as cli

torch.manual_seed(0)
MODEL = lens_det.from_config("tiny-gemma2", seed=0)
TOKENS = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))


def _cache():
    kv = MODEL.new_cache()
    with torch.no_grad():
        MODEL(TOKENS[:, :4], kv_cache=kv)
    return kv


def _state(kv):
    return [(e.keys.clone(), e.values.clone(), e.start) for e in kv.layers], kv.mask.clone()


def _same(a, b):
    (la, ma), (lb, mb) = a, b
    return torch.equal(ma, mb) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
                                       for x, y in zip(la, lb))


def _wrong_shape_hook(kv):
    hook = ("blocks.1.attn.hook_k", lambda x, hook: x[:, :, :1])
    MODEL.run_with_hooks(TOKENS[:, 4:], kv_cache=kv, fwd_hooks=[hook])


def _short_mask(kv):
    MODEL(TOKENS[:, 4:], attention_mask=torch.ones(2, 3, dtype=torch.long), kv_cache=kv)


def _other_batch(kv):
    MODEL(TOKENS[:1, 4:], kv_cache=kv)


CACHE_CASES = {  # name: (call with the cache, error type, message pattern)
    "wrong-shaped hook_k edit": (_wrong_shape_hook, ValueError,
                                 r"hook on blocks\.1\.attn\.hook_k returned \(2, 2, 1, 16\).*\(2, 2, 2, 16\)"),
    "mask shorter than cached + new": (_short_mask, ValueError, "pass the mask for all 6"),
    "another batch size": (_other_batch, ValueError, "batch"),
    "generate max_new_tokens=2.5": (lambda kv: MODEL.generate(TOKENS[:, 4:], kv_cache=kv, max_new_tokens=2.5),
                                    ValueError, "max_new_tokens must be an int >= 1"),
    "generate top_p=1.5": (lambda kv: MODEL.generate(TOKENS[:, 4:], kv_cache=kv, do_sample=True, top_p=1.5),
                           ValueError, r"top_p must be in \(0, 1\]"),
}


@pytest.mark.parametrize("case", CACHE_CASES)
def test_bad_input_with_a_cache_raises_and_leaves_it_unchanged(case):
    call, error, pattern = CACHE_CASES[case]
    kv = _cache()
    before = _state(kv)
    with pytest.raises(error, match=pattern):
        call(kv)
    assert _same(before, _state(kv))


CASES = {
    "new_cache(max_length='10')": (lambda: MODEL.new_cache(max_length="10"), ValueError, "int >= 1"),
    "new_cache(max_length=0)": (lambda: MODEL.new_cache(max_length=0), ValueError, "int >= 1"),
    "new_cache(max_length=-1)": (lambda: MODEL.new_cache(max_length=-1), ValueError, "int >= 1"),
    "generate(max_new_tokens=0)": (lambda: MODEL.generate(TOKENS, max_new_tokens=0), ValueError, "int >= 1"),
    "generate(top_k=-5)": (lambda: MODEL.generate(TOKENS, do_sample=True, top_k=-5), ValueError, "top_k must be"),
    "sampling knobs without do_sample": (lambda: MODEL.generate(TOKENS, temperature=0.7, top_k=5), ValueError,
                                         "only apply when sampling: pass do_sample=True"),
    "from_hf_model(object())": (lambda: lens_det.from_hf_model(object()), TypeError,
                                "PreTrainedModel.*from_pretrained"),
    "dtype='float33'": (lambda: lens_det.from_config("tiny-gemma", dtype="float33"), ValueError, "torch.bfloat16"),
    "place(n_devices=2) without GPUs": (lambda: MODEL.place(n_devices=torch.cuda.device_count() + 1), ValueError,
                                        "CUDA device.*device_map"),
    "to_string without a tokenizer": (lambda: lens_det.from_hf_model(_hf_gemma2()).to_string(TOKENS), ValueError,
                                      "model.tokenizer = transformers.AutoTokenizer"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_raises_a_message_that_names_the_fix(case):
    call, error, pattern = CASES[case]
    with pytest.raises(error, match=pattern):
        call()


def _hf_gemma2(cls=Gemma2ForCausalLM, act="gelu_pytorch_tanh"):
    cfg = Gemma2Config(vocab_size=128, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, hidden_activation=act,
                       attn_implementation="eager", pad_token_id=0)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def test_gemma2_exact_gelu_matches_hf():
    """hidden_activation="gelu" is the exact erf GELU in Gemma 2/3 (it was run as the tanh form before)."""
    hf = _hf_gemma2(act="gelu")
    model = lens_det.from_hf_model(hf)
    assert model.config.act_fn == "gelu_erf" and model.cfg.act_fn == "gelu"  # lens_det name, TL name
    with torch.no_grad():
        assert torch.equal(model(TOKENS), hf(TOKENS).logits)


def test_unsupported_activation_is_refused():
    with pytest.raises(NotImplementedError, match="hidden_activation='gelu_new' is not implemented"):
        lens_det.from_hf_model(_hf_gemma2(act="gelu_new"))


def test_non_causal_heads_are_refused(tmp_path):
    hf = _hf_gemma2(Gemma2ForSequenceClassification)
    with pytest.raises(ValueError, match="Gemma2ForSequenceClassification is not a causal language model.*"
                                         "Gemma2ForCausalLM"):
        lens_det.from_hf_model(hf)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a causal language model"):
        lens_det.from_pretrained(tmp_path)


def test_a_missing_checkpoint_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_gemma2().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensor 'layers\.1\.mlp\.up_proj\.weight'.*incomplete"):
        lens_det.from_pretrained(tmp_path)


def test_from_hf_model_copies_weights_unless_asked_to_share():
    hf = _hf_gemma2()
    reference = hf.model.layers[0].mlp.up_proj.weight.clone()
    model = lens_det.from_hf_model(hf)
    with torch.no_grad():
        model.blocks[0].mlp.w_in.add_(1.0)
    assert torch.equal(hf.model.layers[0].mlp.up_proj.weight, reference)  # the HF reference is untouched
    shared = lens_det.from_hf_model(hf, share_weights=True)
    with torch.no_grad():
        shared.blocks[0].mlp.w_in.add_(1.0)
    assert torch.equal(hf.model.layers[0].mlp.up_proj.weight, reference + 1.0)


def test_dtype_may_be_a_string():
    assert lens_det.from_config("tiny-gemma", dtype="bfloat16").cfg.dtype == torch.bfloat16


@pytest.mark.parametrize("name, pattern", [
    ("tiny-gema2", r"did you mean tiny-gemma2.*lens-det models"),
    ("/no/such/dir", "not a local directory"),
])
def test_cli_unknown_model_fails_fast_with_what_to_do(name, pattern):
    with pytest.raises(SystemExit, match=pattern):
        cli(["parity", "--model", name])


def test_cli_lists_the_named_configs(capsys):
    assert cli(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-gemma2" in out and "bigscience/bloom-560m" in out


def test_cli_prompt_shorter_than_the_schedule_is_continued(capsys):
    """--decode-steps past the input's end: the cached steps run on the model's greedy continuation."""
    assert cli(["parity", "--model", "tiny-bloom", "--dtype", "float32", "--prompt", "Hello",
                "--prefill", "4", "--decode-steps", "8"]) == 0
    assert "4+8x1" in capsys.readouterr().out


# --- issue 19 (items 7, 8a, raw internal errors, TL spellings): each row was a torch error, a silent wrong result
# or a misleading message before ---

def _bf16_hook_k(kv):  # an fp32 model's hook returning another dtype (an SAE reconstruction in its own dtype)
    hook = ("blocks.1.attn.hook_k", lambda x, hook: x.bfloat16())
    MODEL.run_with_hooks(TOKENS[:, 4:], kv_cache=kv, fwd_hooks=[hook])


ISSUE19_CACHE_CASES = {
    "hook_k edit of another dtype": (_bf16_hook_k, ValueError,
                                     r"hook on blocks\.1\.attn\.hook_k returned a torch\.bfloat16 tensor.*"
                                     r"given torch\.float32.*\.to\(tensor\.dtype\)"),
    "kv_cache and past_kv_cache": (lambda kv: MODEL(TOKENS[:, 4:], kv_cache=kv, past_kv_cache=kv), ValueError,
                                   "pass kv_cache or past_kv_cache"),
    "past_kv_cache of another kind": (lambda kv: MODEL(TOKENS[:, 4:], past_kv_cache=[kv]), TypeError,
                                      r"kv_cache=model\.new_cache\(\)"),
    "a batch of 0 prompts with a cache": (lambda kv: MODEL(TOKENS[:0, 4:], kv_cache=kv), ValueError,
                                          "batch of 0 prompts"),
    "prepend_bos with token ids": (lambda kv: MODEL(TOKENS[:, 4:], kv_cache=kv, prepend_bos=False), ValueError,
                                   r"prepend_bos.*apply to text input"),
}


@pytest.mark.parametrize("case", ISSUE19_CACHE_CASES)
def test_issue19_bad_input_with_a_cache_raises_and_leaves_it_unchanged(case):
    call, error, pattern = ISSUE19_CACHE_CASES[case]
    kv = _cache()
    before = _state(kv)
    with pytest.raises(error, match=pattern):
        call(kv)
    assert _same(before, _state(kv))


def _base_model(kind):
    from transformers import BloomConfig, BloomModel, Gemma2Model, Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(0)
    if kind == "bloom":
        return BloomModel(BloomConfig(vocab_size=128, hidden_size=16, n_layer=1, n_head=2)).eval()
    if kind == "gemma2":
        return Gemma2Model(_hf_gemma2().config).eval()
    return Gemma3TextModel(Gemma3TextConfig(vocab_size=128, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=8)).eval()


_EMPTY = torch.zeros(0, 6, dtype=torch.long)
ISSUE19_CASES = {
    "forward on 0 prompts": (lambda: MODEL(_EMPTY), ValueError, r"batch of 0 prompts.*at least one row"),
    "generate on 0 prompts": (lambda: MODEL.generate(_EMPTY, max_new_tokens=2), ValueError, "batch of 0 prompts"),
    "run_with_cache on 0 prompts": (lambda: MODEL.run_with_cache(_EMPTY), ValueError, "batch of 0 prompts"),
    "an empty list of strings": (lambda: MODEL([]), ValueError, r"no prompts.*at least one string"),
    "generate on an empty list of strings": (lambda: MODEL.generate([]), ValueError, "no prompts"),
    "to_tokens([])": (lambda: MODEL.to_tokens([]), ValueError, "no prompts"),
    "a residual stream of 0 rows": (lambda: MODEL(torch.zeros(0, 6, MODEL.cfg.d_model), start_at_layer=0), ValueError,
                                    "batch of 0"),
    "kv_cache of another kind": (lambda: MODEL(TOKENS, kv_cache={}), TypeError, r"model\.new_cache\(\)"),
    "from_config(dtype=torch.float64)": (lambda: lens_det.from_config("tiny-gemma", dtype=torch.float64), ValueError,
                                         r"float64 is not supported.*torch\.float32"),
    "from_config(dtype='float64')": (lambda: lens_det.from_config("tiny-bloom", dtype="float64"), ValueError,
                                     "float64 is not supported"),
    "from_config(dtype=torch.int8)": (lambda: lens_det.from_config("tiny-bloom", dtype=torch.int8), ValueError,
                                      "int8 is not supported"),
    "model.to(torch.float64)": (lambda: MODEL.to(torch.float64), ValueError, r"float64 is not supported.*\.to\("),
    "model.to(dtype=torch.float64)": (lambda: MODEL.to("cpu", dtype=torch.float64), ValueError, "float64"),
    "model.double()": (lambda: MODEL.double(), ValueError, "float64 is not supported"),
    "model.type(torch.float64)": (lambda: MODEL.type(torch.float64), ValueError, "float64 is not supported"),
    "Gemma3TextModel (no LM head)": (lambda: lens_det.from_hf_model(_base_model("gemma3")), ValueError,
                                     r"Gemma3TextModel is not a causal language model.*instead \(Gemma3ForCausalLM;"),
    "Gemma2Model (no LM head)": (lambda: lens_det.from_hf_model(_base_model("gemma2")), ValueError,
                                 r"instead \(Gemma2ForCausalLM;"),
    "BloomModel (no LM head)": (lambda: lens_det.from_hf_model(_base_model("bloom")), ValueError,
                                r"instead \(BloomForCausalLM;"),
}


@pytest.mark.parametrize("case", ISSUE19_CASES)
def test_issue19_bad_input_raises_a_message_that_names_the_fix(case):
    call, error, pattern = ISSUE19_CASES[case]
    with pytest.raises(error, match=pattern):
        call()
    assert MODEL.cfg.dtype == torch.float32  # a refused .to() changed nothing


def test_issue19_a_base_model_checkpoint_names_its_causal_lm_class(tmp_path):
    _base_model("gemma3").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Gemma3TextModel is not a causal.*instead \(Gemma3ForCausalLM;"):
        lens_det.from_pretrained(tmp_path)


# --- issue 19 (items 3, 4, 8b, freq_penalty): generate's continuation from a cache, step_hooks, token ids. Each
# row was silently accepted before (ids outside the vocabulary, cached tokens appended again) or is a new option ---

def _generate_state(kv):  # the cache as _state sees it, plus the token ids it holds and what generate left pending
    return _state(kv), kv.tokens.clone(), kv.pending


_LONG = dict(dtype=torch.long)
GENERATE_CACHE_CASES = {
    "stop_tokens outside the vocabulary": (
        lambda kv: MODEL.generate(TOKENS[:, 4:], kv_cache=kv, stop_tokens=[5, MODEL.cfg.d_vocab]), ValueError,
        r"stop token \(stop_tokens / eos_token_id\) 128 is outside the vocabulary \[0, 128\); pass token ids from 0 "
        r"to 127"),
    "eos_token_id (TransformerLens) below 0": (lambda kv: MODEL.generate(TOKENS[:, 4:], kv_cache=kv, eos_token_id=-1),
                                               ValueError, r"eos_token_id\) -1 is outside the vocabulary"),
    "stop_tokens=[2.5]": (lambda kv: MODEL.generate(TOKENS[:, 4:], kv_cache=kv, stop_tokens=[2.5]), TypeError,
                          "must be integer token ids"),
    "pad_token_id outside the vocabulary": (lambda kv: MODEL.generate(TOKENS[:, 4:], kv_cache=kv, pad_token_id=128),
                                            ValueError, r"pad_token_id 128 is outside the vocabulary \[0, 128\)"),
    "pad_token_id=[0, 1]": (lambda kv: MODEL.generate(TOKENS[:, 4:], kv_cache=kv, pad_token_id=[0, 1]), TypeError,
                            "pad_token_id must be one token id"),
    "tokens at cached positions that differ from the cache's": (
        lambda kv: MODEL.generate(torch.cat([TOKENS[:, :3], TOKENS[:, :3]], 1), torch.ones(2, 6, **_LONG),
                                  kv_cache=kv), ValueError,
        r"first 4 of the 6 tokens are cached positions, but they differ from the tokens the cache holds.*pass the "
        r"sequence the cache was built from followed by the new tokens"),
    "only the tokens the cache already holds": (lambda kv: MODEL.generate(TOKENS[:, :4], kv_cache=kv), ValueError,
                                                r"already holds these 4 tokens, so none is new.*torch\.cat"),
    "a mask no longer than the cache": (
        lambda kv: MODEL.generate(TOKENS[:, 4:], torch.ones(2, 4, **_LONG), kv_cache=kv), ValueError,
        r"covers 4 positions but the cache already holds 4.*\(cache\.mask\) followed by the new tokens' mask"),
    "tokens longer than the mask": (lambda kv: MODEL.generate(TOKENS, torch.ones(2, 5, **_LONG), kv_cache=kv),
                                    ValueError, r"tokens have 6 positions but attention_mask covers only 5"),
    "freq_penalty without do_sample": (lambda kv: MODEL.generate(TOKENS[:, 4:], kv_cache=kv, freq_penalty=0.5),
                                       ValueError, r"freq_penalty=0\.5 only apply when sampling: pass do_sample=True"),
    "freq_penalty=-1": (lambda kv: MODEL.generate(TOKENS[:, 4:], kv_cache=kv, do_sample=True, freq_penalty=-1),
                        ValueError, r"freq_penalty must be a number >= 0"),
    "step_hooks key -1": (lambda kv: MODEL.generate(TOKENS[:, 4:], kv_cache=kv, step_hooks={-1: []}), ValueError,
                          r"step_hooks keys are steps, ints >= 0 \(0: the prompt's forward"),
}


@pytest.mark.parametrize("case", GENERATE_CACHE_CASES)
def test_issue19_generate_bad_input_with_a_cache_raises_and_leaves_it_unchanged(case):
    call, error, pattern = GENERATE_CACHE_CASES[case]
    kv = _cache()
    before = _generate_state(kv)
    with pytest.raises(error, match=pattern):
        call(kv)
    after = _generate_state(kv)
    assert _same(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2] is after[2] is None


def _uncached_step_hook(edit):  # without the cache a step hook gets the step's positions only: [2, 1, d_model]
    return MODEL.generate(TOKENS, max_new_tokens=3, use_kv_cache=False, stop_tokens=[],
                          step_hooks={1: [("blocks.0.hook_resid_pre", lambda x, hook: edit(x))]})


GENERATE_CASES = {
    "uncached step hook returning another shape": (lambda: _uncached_step_hook(lambda x: x[:, :, :3]), ValueError,
                                                   r"hook on blocks\.0\.hook_resid_pre returned \(2, 1, 3\).*"
                                                   r"shape it was given, \(2, 1, 64\)"),
    "uncached step hook returning another dtype": (lambda: _uncached_step_hook(lambda x: x.bfloat16()), ValueError,
                                                   r"returned a torch\.bfloat16 tensor, but it was given "
                                                   r"torch\.float32.*cast the edit back"),
    "step_hooks key '0'": (lambda: MODEL.generate(TOKENS, step_hooks={"0": []}), ValueError, "ints >= 0"),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_issue19_generate_bad_input_raises_a_message_that_names_the_fix(case):
    call, error, pattern = GENERATE_CASES[case]
    with pytest.raises(error, match=pattern):
        call()
