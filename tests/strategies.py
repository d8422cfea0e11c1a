"""Hypothesis strategies and builders for the property tests (tests/parity/test_property.py,
tests/tl/test_weight_processing.py): random valid HF configs of every supported family, padded batches, ragged
chunk schedules, and the seeded HF model / lens_det pair built from a drawn config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import event, note
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

import lens_det
from lens_det.config import LensConfig
from lens_det.convert import sdpa_refusal
from lens_det.parity.report import Schedule

FAMILIES = ["bloom", "gemma", "gemma2", "gemma3_text", "vaultgemma", "gemma4_text", "gemma3n_text"]
ACTIVATIONS = ["gelu_pytorch_tanh", "gelu"]


# ----------------------------------------------------------------------------------------------- strategies


def _rope(draw) -> dict:
    """One rope_parameters dict: default or linear scaling (factor >= 1, as HF validates), any theta."""
    theta = draw(st.sampled_from([100.0, 5e3, 1e4, 12345.6, 1e6]))
    factor = draw(st.sampled_from([None, 1.0, 1.5, 2.0, 3.0, 8.0]))
    if factor is None:
        return {"rope_type": "default", "rope_theta": theta}
    return {"rope_type": "linear", "factor": factor, "rope_theta": theta}


def _gemma4(draw, n_layers: int, n_heads: int, vocab: int) -> dict:
    """Gemma 4 text: per-layer-type head dims and kv heads, K = V, proportional (partial) RoPE on full layers,
    weightless v_norm, layer scalars (drawn with the weights), final soft-cap; per-layer embeddings, KV sharing of
    the last layers (when the remaining layers still produce every layer type, as HF requires) and the double-wide
    MLP. HF forces the last layer to full attention, so it is drawn that way."""
    layer_types = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=n_layers - 1,
                                max_size=n_layers - 1)) + ["full_attention"]
    divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
    full = {"rope_type": "proportional", "rope_theta": draw(st.sampled_from([1e4, 1e6])),
            "partial_rotary_factor": draw(st.sampled_from([0.25, 0.5, 1.0]))}
    if draw(st.booleans()):
        full["factor"] = draw(st.sampled_from([1.0, 2.0, 8.0]))
    ple = draw(st.sampled_from([0, 1, 3, 8]))
    return dict(hidden_activation=draw(st.sampled_from(ACTIVATIONS)), layer_types=layer_types,
                sliding_window=draw(st.integers(1, 12)), global_head_dim=draw(st.sampled_from([2, 4, 8, 12])),
                attention_k_eq_v=draw(st.booleans()),
                num_global_key_value_heads=draw(st.one_of(st.none(), st.sampled_from(divisors))),
                final_logit_softcapping=draw(st.sampled_from([None, 0.5, 5.0, 30.0])),
                rope_parameters={"full_attention": full, "sliding_attention": _rope(draw)},
                hidden_size_per_layer_input=ple, vocab_size_per_layer_input=vocab,
                # KV sharing only with PLE: HF 5.23 fails without (lens_det refuses it, tests/parity/test_gemma4.py)
                num_kv_shared_layers=_kv_shared(draw, layer_types) if ple else 0,
                use_double_wide_mlp=draw(st.booleans()), enable_moe_block=False)


def _gemma3n(draw, n_layers: int, vocab: int, pad: int) -> dict:
    """Gemma 3n text: 2-4 AltUp streams (with or without correct_output_scale), LAuReL, per-layer MLP widths and
    gate sparsity, per-layer embeddings from a table that may be smaller than the vocabulary, KV sharing."""
    layer_types = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=n_layers,
                                max_size=n_layers))
    return dict(hidden_activation=draw(st.sampled_from(ACTIVATIONS)), layer_types=layer_types,
                sliding_window=draw(st.integers(1, 12)),
                final_logit_softcapping=draw(st.sampled_from([0.5, 5.0, 30.0])),  # Gemma3nTextConfig: a float
                rope_parameters={"full_attention": _rope(draw), "sliding_attention": _rope(draw)},
                altup_num_inputs=draw(st.integers(2, 4)), altup_correct_scale=draw(st.booleans()),
                laurel_rank=draw(st.integers(1, 4)), hidden_size_per_layer_input=draw(st.sampled_from([1, 3, 8])),
                vocab_size_per_layer_input=draw(st.integers(pad + 1, vocab)),  # HF: padding_idx must fit
                intermediate_size=draw(st.lists(st.integers(1, 24), min_size=n_layers, max_size=n_layers)),
                activation_sparsity_pattern=draw(st.lists(st.sampled_from([0.0, 0.3, 0.95]), min_size=n_layers,
                                                          max_size=n_layers)),
                num_kv_shared_layers=_kv_shared(draw, layer_types))


def _kv_shared(draw, layer_types: list[str]) -> int:
    """How many trailing layers share K/V: any count whose leading layers still include every layer type."""
    valid = [n for n in range(len(layer_types)) if set(layer_types[: len(layer_types) - n]) == set(layer_types)]
    return draw(st.sampled_from(valid))


@st.composite
def config_kwargs(draw, families=tuple(FAMILIES)):
    """(model_type, kwargs) of a valid HF config: `AutoConfig.for_model(model_type, **kwargs)`."""
    family = draw(st.sampled_from(families))
    n_layers = draw(st.integers(1, 3))
    vocab = draw(st.integers(8, 96))
    pad_ids = st.integers(0, vocab - 1)
    pad = draw(st.one_of(st.none(), pad_ids) if family == "bloom" else pad_ids)  # BloomConfig's default is None
    kw = dict(vocab_size=vocab, pad_token_id=pad, bos_token_id=draw(st.integers(0, vocab - 1)),
              eos_token_id=draw(st.integers(0, vocab - 1)), num_hidden_layers=n_layers,
              tie_word_embeddings=draw(st.booleans()))
    if family == "bloom":
        n_head = draw(st.integers(1, 6))  # 3, 5, 6: ALiBi's non-power-of-two slopes
        hidden = n_head * draw(st.integers(1, 6))
        kw |= dict(n_head=n_head, hidden_size=hidden,
                   apply_residual_connection_post_layernorm=draw(st.booleans()),
                   layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.5])),
                   # pretraining_tp > 1 without slow_but_exact is HF's ordinary path
                   pretraining_tp=draw(st.sampled_from([1, 2, 3])), slow_but_exact=False)
        return family, kw
    n_kv = draw(st.integers(1, 3))
    n_heads = n_kv * draw(st.integers(1, 3))  # MHA (x1), GQA, MQA (n_kv = 1)
    if family == "gemma":  # GemmaConfig does not require hidden % heads == 0
        hidden = draw(st.integers(2, 24))
    else:
        hidden = n_heads * draw(st.integers(1, 6))
    kw |= dict(num_attention_heads=n_heads, num_key_value_heads=n_kv, hidden_size=hidden,
               head_dim=draw(st.sampled_from([2, 4, 6, 8, 10])),  # RoPE needs an even head_dim
               intermediate_size=draw(st.integers(1, 24)),
               rms_norm_eps=draw(st.sampled_from([1e-6, 1e-3, 0.5])),
               attention_bias=draw(st.booleans()))
    if family == "gemma":
        return family, kw | dict(hidden_act=draw(st.sampled_from(ACTIVATIONS)), rope_parameters=_rope(draw))
    if family == "gemma4_text":
        return family, kw | _gemma4(draw, n_layers, n_heads, vocab)
    if family == "gemma3n_text":
        return family, kw | _gemma3n(draw, n_layers, vocab, pad)
    kw |= dict(hidden_activation=draw(st.sampled_from(ACTIVATIONS)),
               sliding_window=draw(st.integers(1, 12)),
               query_pre_attn_scalar=draw(st.sampled_from([1, 4, 8, 20, 256])),
               final_logit_softcapping=draw(st.sampled_from([None, 0.5, 5.0, 30.0])),
               # Gemma 3's modeling ignores attn_logit_softcapping: drawn anyway
               attn_logit_softcapping=draw(st.sampled_from([None, 1.0, 50.0])),
               layer_types=draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]),
                                         min_size=n_layers, max_size=n_layers)))
    if family in ("gemma2", "vaultgemma"):
        return family, kw | dict(rope_parameters=_rope(draw))
    return family, kw | dict(rope_parameters={"full_attention": _rope(draw), "sliding_attention": _rope(draw)})


@st.composite
def batches(draw, vocab: int, pad: int | None, min_len: int = 1, max_len: int = 10):
    """(tokens, mask): every row has at least one real token; some real tokens carry the pad id."""
    n_rows, length = draw(st.integers(1, 3)), draw(st.integers(min_len, max_len))
    tokens = torch.tensor(draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length),
                                        min_size=n_rows, max_size=n_rows)))
    mask = torch.ones(n_rows, length, dtype=torch.long)
    for row in range(n_rows):
        kind = draw(st.sampled_from(["none", "left", "right", "inner", "single"]))
        if kind == "left":
            mask[row, : draw(st.integers(0, length - 1))] = 0
        elif kind == "right":
            mask[row, length - draw(st.integers(0, length - 1)):] = 0
        elif kind == "inner":
            holes = draw(st.lists(st.integers(0, length - 1), max_size=length - 1, unique=True))
            mask[row, holes] = 0
        elif kind == "single":
            mask[row] = 0
            mask[row, draw(st.integers(0, length - 1))] = 1
        if pad is not None:
            if draw(st.booleans()):  # masked positions hold the pad id (a tokenizer's padding) or garbage
                tokens[row, mask[row] == 0] = pad
            real = mask[row].nonzero().flatten()
            for i in draw(st.lists(st.integers(0, len(real) - 1), min_size=1, max_size=len(real), unique=True)):
                tokens[row, real[i]] = pad  # real tokens with the pad id: attended, not masked
    return tokens, mask


@st.composite
def ragged_bounds(draw, n: int) -> tuple[int, ...]:
    """Chunk ends of a cached run over n tokens: any split of [0, n) into consecutive non-empty chunks (one
    chunk, a prefill then decode steps of a fixed size, token by token, or random cuts)."""
    if n == 1:
        return (1,)
    kind = draw(st.sampled_from(["prefill+steps", "random", "tokenwise", "one"]))  # shrinks towards the first
    if kind == "one":
        return (n,)
    if kind == "prefill+steps":
        prefill, step = draw(st.integers(1, n - 1)), draw(st.integers(1, 3))
        return (*range(prefill, n, step), n)
    if kind == "tokenwise":
        return tuple(range(1, n + 1))
    cuts = draw(st.lists(st.integers(1, n - 1), min_size=1, max_size=n - 1, unique=True))
    return (*sorted(cuts), n)


@dataclass(frozen=True)
class Ragged(Schedule):
    """A compare() schedule with arbitrary chunk ends (Schedule's fields describe its first chunk)."""

    ends: tuple[int, ...] = (1,)

    @property
    def length(self) -> int:
        return self.ends[-1]

    def bounds(self) -> list[tuple[int, int]]:
        return list(zip((0, *self.ends[:-1]), self.ends))

    @classmethod
    def of(cls, ends: tuple[int, ...]) -> Ragged:
        return cls(prefill=ends[0], decode_steps=len(ends) - 1, chunk=0, ends=tuple(ends))


# ----------------------------------------------------------------------------------------------- models


def build_hf(family: str, kwargs: dict, dtype: torch.dtype, seed: int, std: float, attn: str = "eager"):
    """HF model of the config with attn_implementation `attn` ("eager" or "sdpa"); every parameter N(0, std) in
    float32 from `seed`, rounded to dtype."""
    cfg = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        persistent = hf.state_dict().keys()  # e.g. Gemma 4's layer_scalar: a checkpoint value, not a constant
        for name, buffer in hf.named_buffers():
            if name in persistent and buffer.is_floating_point():
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * std)
    return hf


def reproducer(family, kwargs, dtype, seed, std, attn: str = "eager") -> str:
    return (f"hf = build_hf({family!r}, {kwargs!r}, {dtype}, seed={seed}, std={std}, attn={attn!r})  "
            f"# = AutoConfig.for_model({family!r}, **kwargs), {attn}, weights N(0, std); "
            f"model = lens_det.from_hf_model(hf); model.attn_implementation = {attn!r}")


def draw_attn(data, family: str, kwargs: dict) -> str:
    """The attention implementation both models run: "eager", or "sdpa" where HF and lens_det have it
    (lens_det.convert.sdpa_refusal: not Bloom, Gemma 2, VaultGemma or an attention soft-cap)."""
    hf_cfg = AutoConfig.for_model(family, **kwargs)  # no `architectures`: sdpa_refusal takes the family's causal LM
    if sdpa_refusal(LensConfig.from_hf_config(hf_cfg)) is not None:
        return "eager"
    return data.draw(st.sampled_from(["eager", "sdpa"]), label="attn_implementation")


def build_pair(data, family, kwargs, dtype, seed, std):
    """(hf, lens_det model), both running a drawn attention implementation."""
    attn = draw_attn(data, family, kwargs)
    note(reproducer(family, kwargs, dtype, seed, std, attn))
    event(f"attention {attn}")
    hf = build_hf(family, kwargs, dtype, seed, std, attn)
    model = lens_det.from_hf_model(hf)
    model.attn_implementation = attn  # from_hf_model follows the HF model's (once it does: a no-op)
    return hf, model
