"""HookedDecoder: the one model class for Bloom and Gemma 1/2/3, a `transformer_lens.HookedRootModule`."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from transformer_lens import ActivationCache, HookedRootModule
from lens_det.components.hooks import HookPoint, position_dim

from lens_det import ops
from lens_det.components.block import Block
from lens_det.components.context import ForwardContext
from lens_det.components.embed import Embed, Unembed
from lens_det.components.norms import make_norm
from lens_det.components.per_layer import PerLayerEmbed
from lens_det.components.positions import positions_from_mask
from lens_det.config import LensConfig
from lens_det.kv_cache import KVCache

PositionIds = Int[torch.Tensor, "batch pos"] | Literal["arange", "mask"] | None


class RuntimeConfig:
    """`model.cfg`: the architecture config plus the runtime fields TransformerLens reads (device, dtype)."""

    def __init__(self, model: HookedDecoder):
        self._model = model

    def __getattr__(self, name: str):
        if name.startswith("_"):  # copy/pickle probe dunders before __init__ ran
            raise AttributeError(name)
        return getattr(self._model.config, name)

    @property
    def device(self) -> torch.device:
        return self._model.embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self._model.embed.W_E.dtype

    def __repr__(self) -> str:
        return f"RuntimeConfig({self._model.config}, device={self.device}, dtype={self.dtype})"

    # --- TransformerLens's names and conventions for what TL tools read (-1.0: no soft-cap, as TL) ---
    TL_ACT_FN = {"bloom_gelu": "gelu_fast", "gelu_tanh": "gelu_pytorch_tanh", "gelu_erf": "gelu"}

    act_fn = property(lambda self: self.TL_ACT_FN[self._model.config.act_fn])  # lens_det's name: model.config
    positional_embedding_type = property(lambda self: {"alibi": "alibi", "rope": "rotary"}[self.positional])
    d_vocab_out = property(lambda self: self.d_vocab)
    eps = property(lambda self: self.norm_eps)
    window_size = property(lambda self: self.sliding_window)
    attn_types = property(lambda self: ["local" if t == "sliding_attention" else "global" for t in self.layer_types])
    output_logits_soft_cap = property(lambda self: self.final_softcap or -1.0)
    attn_scores_soft_cap = property(lambda self: self.attn_softcap or -1.0)
    original_architecture = property(lambda self: self.hf_architecture)
    model_name = property(lambda self: getattr(self._model, "name", None) or self.architecture)
    default_prepend_bos = True
    rmsnorm_uses_offset = property(lambda self: self.rmsnorm_unit_offset)

    @property
    def normalization_type(self) -> str:  # TL: "LNPre" / "RMSPre" once fold_ln left the norms weightless
        kind = self._model.config.normalization_type
        return kind + "Pre" if "fold_ln" in self._model.processing else kind
    use_attn_result = property(lambda self: all(b.attn.use_attn_result for b in self._model.blocks))

    @property
    def rotary_base(self):  # a global (full-attention) layer's theta, as TL; None for ALiBi
        if self.rope_theta is None:
            return None
        full = [t for t, kind in zip(self.rope_theta, self.layer_types) if kind == "full_attention"]
        return (full or list(self.rope_theta))[0]

    @property
    def tokenizer_prepends_bos(self) -> bool | None:
        tok = self._model.tokenizer
        if tok is None or tok.bos_token_id is None:
            return None if tok is None else False
        return tok("a")["input_ids"][:1] == [tok.bos_token_id]


TO_TOKENS_IDIOM = ("model.to_tokens returns (tokens, attention_mask), not a tensor (a lost mask would silently "
                   "attend to pads): write `tokens, mask = model.to_tokens(text)` and pass attention_mask=mask, or "
                   "pass the pair or the text itself: model(model.to_tokens(text)), model(text), "
                   "model.run_with_cache(text), model.generate(text)")


def _or_zeros(bias, like):
    return bias if bias is not None else torch.zeros_like(like)


class TokensAndMask(tuple):
    """(tokens, attention_mask) from to_tokens; unpacks as a pair. Passed whole to forward, run_with_cache,
    run_with_hooks or generate it runs with its mask (and, like text, positions from the mask), so TransformerLens's
    `model(model.to_tokens(text))` is right. TransformerLens code that treats it as the token tensor
    (`tokens.shape`, `tokens[:, 1:]`) gets an error that says what to write instead."""

    def __getattr__(self, name):
        raise AttributeError(f"{name!r}: {TO_TOKENS_IDIOM}")

    def __getitem__(self, index):  # pair[0], pair[1] as a tuple; tensor indexing says what to write
        if isinstance(index, tuple):
            raise TypeError(f"indexing the pair as a tensor: {TO_TOKENS_IDIOM}")
        return super().__getitem__(index)


NO_TOKENIZER = ("this model has no tokenizer, so it takes token ids only: set one with `model.tokenizer = "
                "transformers.AutoTokenizer.from_pretrained(name_or_dir)` or load with from_pretrained(name_or_dir), "
                "which attaches the checkpoint's tokenizer (from_config models carry an offline character tokenizer)")


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes whose HF reference lens_det matches


def check_dtype(dtype: torch.dtype, fix: str) -> torch.dtype:
    """`dtype` when lens_det runs in it, else ValueError ending with `fix` (what to pass instead)."""
    if dtype in SUPPORTED_DTYPES:
        return dtype
    why = (" (HF's own float64 models return NaN for every position of a left-padded row: their softmax runs in "
           "float32, where the mask value finfo(float64).min becomes -inf, so a fully masked pad row is NaN and "
           "spreads; the mixture of experts' grouped_mm has no float64 kernel. There is no HF reference to match)"
           if dtype == torch.float64 else "")
    raise ValueError(f"{dtype} is not supported{why}: lens_det runs torch.float32 (the default), torch.bfloat16 and "
                     f"torch.float16; {fix}")


def unknown_hook_message(name: str, hook_names) -> str:
    import difflib

    msg = f"{name!r} is not a hook point of this model"
    close = difflib.get_close_matches(name, list(hook_names), n=3)
    return msg + (f" (did you mean {', '.join(close)}?)" if close else "; model.hook_dict lists them all")


class LensActivationCache(ActivationCache):
    """TransformerLens's ActivationCache; decompositions that claim to sum to the residual stream refuse models
    where they would not (instead of returning parts that silently do not add up)."""

    def get_full_resid_decomposition(self, *args, **kwargs):
        why = self.model.why_residual_not_additive()
        if why is not None:
            instead = ("cache.decompose_resid() (attn_out / mlp_out are what is added) or " if not
                       self.model.config.layer_scalar else "not cache.decompose_resid() either; use ")
            raise ValueError(f"get_full_resid_decomposition would not sum to the residual stream here: {why}. Use "
                             f"{instead}stack_head_results(incl_remainder=True), whose remainder absorbs the "
                             "difference")
        return super().get_full_resid_decomposition(*args, **kwargs)

    def decompose_resid(self, *args, **kwargs):
        if self.model.config.layer_scalar:
            raise ValueError("decompose_resid would not sum to the residual stream here: each block multiplies the "
                             "whole residual stream by its layer_scalar (blocks.{i}.layer_scalar), so the stream is "
                             "not embed + the attn_out / mlp_out of earlier blocks. Read cache['resid_post', i] "
                             "directly, or scale each part by the product of the later blocks' layer_scalar")
        return super().decompose_resid(*args, **kwargs)


class HookedDecoder(HookedRootModule):
    """A decoder-only transformer whose every activation is a TransformerLens-named HookPoint.

    The forward pass reproduces the HF eager model of the same config bit for bit (docs/numerics.md).
    """

    def __init__(self, config: LensConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = config
        self.embed = Embed(config)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if config.d_per_layer_input:  # Gemma 4 per-layer embeddings (lens_det.components.per_layer)
            self.ple = PerLayerEmbed(config)
            self.hook_per_layer_inputs = HookPoint()  # [batch, pos, n_layers, d_per_layer_input]
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        # HF's _maybe_slice_kv_shared_inputs: from this layer on every layer is a KV-sharing consumer, so with an
        # integer logits_to_keep they run on the kept positions only (None: no such tail)
        sources = config.kv_source_layer or (None,) * config.n_layers
        consumers = [i for i, j in enumerate(sources) if j is not None]
        self.kv_consumer_tail = consumers[0] if consumers and consumers == list(range(consumers[0],
                                                                                      config.n_layers)) else None
        self.ln_final = make_norm(config)
        self.unembed = Unembed(config, self.embed)
        self.tokenizer = None
        self.name: str | None = None  # the checkpoint or named config it was loaded from (cfg.model_name)
        self.deterministic = False  # batch-invariant ops on every forward (same as `with lens_det.deterministic()`)
        # absolute index of the first position the running hooks see: the call's first token (under a KV cache), or,
        # after the KV-sharing layers were cut to logits_to_keep positions, the first kept one
        self.query_start = 0
        self.processing: tuple[str, ...] = ()  # weight-processing steps applied (process_weights_); () = HF-exact
        self.to(device=device, dtype=dtype)
        self.eval()  # inference model (no dropout); TransformerLens' patching requires eval mode
        self.setup()

    @property
    def cfg(self) -> RuntimeConfig:
        return RuntimeConfig(self)

    def to(self, *args, **kwargs) -> HookedDecoder:
        """nn.Module.to; a dtype lens_det does not run in (float64, see check_dtype) is refused before anything
        moves."""
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]  # how nn.Module.to reads its arguments
        if dtype is not None:
            check_dtype(dtype, "use model.to(torch.float32) or model.to(torch.bfloat16)")
        return super().to(*args, **kwargs)

    def double(self):
        """Refused (raises): lens_det does not run in float64 (check_dtype says why)."""
        return check_dtype(torch.float64, "use model.float() (float32) or model.bfloat16()")

    def type(self, dst_type) -> HookedDecoder:
        """nn.Module.type; a dtype lens_det does not run in is refused before anything is cast."""
        if isinstance(dst_type, torch.dtype):
            check_dtype(dst_type, "use model.to(torch.float32) or model.to(torch.bfloat16)")
        return super().type(dst_type)

    @property
    def attn_implementation(self) -> str:
        """How attention computes, named as HF's `attn_implementation` (a runtime choice): "eager" (HF's
        eager_attention_forward: scores, mask, softmax, @ V) or "sdpa" (HF's call of
        torch.nn.functional.scaled_dot_product_attention, HF 5's default for Gemma 1, 3 and 4). The two round
        differently, and differ on fully padded query rows, so a model matches an HF model bit for bit only with
        the same choice; `from_hf_model` copies the HF model's. Under sdpa there is no hook_attn_scores /
        hook_pattern to compute: a layer whose pattern hooks are hooked runs eager for that call (with a warning).
        Deterministic mode runs its own eager ops either way (docs/numerics.md §10)."""
        return self.blocks[0].attn.implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        from lens_det.convert import resolve_attn_implementation

        if value is None:
            raise ValueError("attn_implementation must be 'eager' or 'sdpa', got None")
        value = resolve_attn_implementation(self.config, value)
        for block in self.blocks:
            block.attn.implementation = value

    @property
    def experts_implementation(self) -> str | None:
        """How the MoE experts compute (a runtime choice, as HF's `config._experts_implementation`): "grouped_mm"
        (HF's default) or "eager" (HF's loop over experts); the two round differently, so a model matches an HF
        model bit for bit only with the same choice. `from_hf_model` copies the HF model's. None without experts.
        Deterministic mode ignores it (lens_det.components.moe)."""
        return next((b.moe.implementation for b in self.blocks if hasattr(b, "moe")), None)

    @experts_implementation.setter
    def experts_implementation(self, value: str) -> None:
        from lens_det.components.moe import EXPERTS_IMPLEMENTATIONS

        if not self.config.n_experts:
            raise ValueError("this model has no mixture of experts (n_experts=0), so it has no experts_implementation")
        if value not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation must be one of {EXPERTS_IMPLEMENTATIONS}, got {value!r} "
                             "(other transformers implementations are not implemented)")
        for block in self.blocks:
            block.moe.implementation = value

    # --- TransformerLens-style weight views ---
    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        return self.unembed.w.T

    # --- TransformerLens's stacked weights: [n_layers, ...] with TL's shapes; zeros where a family has no bias ---
    def _stack(self, get) -> torch.Tensor:
        return torch.stack([get(b) for b in self.blocks])

    def _attn_stack(self, name: str) -> torch.Tensor:
        """blocks[i].attn.<name> stacked over layers; refused when layers differ in d_head / kv heads (Gemma 4)."""
        if not self.config.uniform_attention_geometry:
            shapes = sorted({(b.attn.d_head, b.attn.n_kv_heads) for b in self.blocks})
            raise ValueError(
                f"model.{name} stacks every layer's weights, but this model's layers have different attention shapes "
                f"((d_head, kv heads) = {shapes}, cfg.layer_d_head(i) / cfg.layer_n_key_value_heads(i)); use "
                f"model.blocks[i].attn.{name} per layer"
            )
        return self._stack(lambda b: getattr(b.attn, name))

    W_Q = property(lambda self: self._attn_stack("W_Q"))  # [layer, head, d_model, d_head]
    W_K = property(lambda self: self._attn_stack("W_K"))  # GQA: repeated to n_heads, as TL
    W_V = property(lambda self: self._attn_stack("W_V"))
    W_O = property(lambda self: self._attn_stack("W_O"))  # [layer, head, d_head, d_model]
    b_Q = property(lambda self: self._attn_stack("b_Q"))  # [layer, head, d_head]
    b_K = property(lambda self: self._attn_stack("b_K"))
    b_V = property(lambda self: self._attn_stack("b_V"))
    b_O = property(lambda self: self._stack(lambda b: b.attn.b_O))  # [layer, d_model]
    _W_K = property(lambda self: self._attn_stack("_W_K"))  # GQA: [layer, kv_head, d_model, d_head]
    _W_V = property(lambda self: self._attn_stack("_W_V"))
    def _mlp_stack(self, get) -> torch.Tensor:
        """get(block) stacked over layers; refused when layers differ in MLP width (Gemma 4's double-wide MLP)."""
        if not self.config.uniform_mlp_width:
            raise ValueError(f"this model's layers have different MLP widths (cfg.layer_d_mlp(i): "
                             f"{sorted(set(self.config.d_mlp_per_layer))}), so they do not stack; use "
                             "model.blocks[i].mlp per layer")
        return self._stack(get)

    W_in = property(lambda self: self._mlp_stack(lambda b: b.mlp.W_in))  # [layer, d_model, d_mlp]
    W_out = property(lambda self: self._mlp_stack(lambda b: b.mlp.W_out))  # [layer, d_mlp, d_model]
    b_in = property(lambda self: self._mlp_stack(lambda b: _or_zeros(b.mlp.b_in, b.mlp.w_in[:, 0])))  # [layer, d_mlp]
    b_out = property(lambda self: self._stack(lambda b: _or_zeros(b.mlp.b_out, b.mlp.w_out[:, 0])))

    @property
    def W_gate(self):  # [layer, d_model, d_mlp]; None without a gated MLP (Bloom), as TL
        return self._mlp_stack(lambda b: b.mlp.W_gate) if self.cfg.gated_mlp else None

    @property
    def b_U(self):  # [d_vocab]: zeros unless fold_ln moved a final LayerNorm bias here (final_norm_bias_logits)
        return _or_zeros(self.unembed.bias, self.unembed.w[:, 0])

    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = True,
                         center_unembed: bool = True, fold_value_biases: bool = True,
                         refactor_factored_attn_matrices: bool = False) -> HookedDecoder:
        """TransformerLens's weight processing, in place, with TL's defaults and meaning; each step must be valid
        for the family (RMSNorm cannot be centred, a soft-capped unembedding cannot be centred, RoPE / GQA have no
        QK refactor) or ValueError says which to switch off. The logits (log-probs after center_unembed) stay equal
        up to float rounding; the model is then no longer HF-exact (`model.processing` lists the steps). Also
        available at load time: from_pretrained / from_hf_model / from_config(..., fold_ln=True, ...)."""
        from lens_det.weight_processing import process_weights_

        return process_weights_(self, fold_ln, center_writing_weights, center_unembed, fold_value_biases,
                                refactor_factored_attn_matrices)

    @property
    def OV(self):
        """TransformerLens's FactoredMatrix W_V @ W_O, [layer, head, d_model, d_model]."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    @property
    def QK(self):
        """TransformerLens's FactoredMatrix W_Q @ W_K^T, [layer, head, d_model, d_model] (before RoPE/ALiBi)."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    def new_cache(self, max_length: int | None = None) -> KVCache:
        """An empty KV cache for this model; `max_length` caps the tokens it may hold (checked before compute)."""
        return KVCache(self.config, max_length=max_length)

    @torch.compiler.disable(recursive=False)  # this frame stays Python; the frames it calls are still compiled
    def __call__(self, *args, **kwargs):
        """nn.Module's call, with torch.compile guarding on every module's hooks while it compiles this model's code.
        torch's default, `torch._dynamo.config.skip_nnmodule_hook_guards = True`, does not guard on a hook dict that
        was empty when a graph was compiled: a hook added later would not run (nor would the code that branches on
        whether a hook is attached), with no error. Set for the duration of this call and restored after (the config
        is process-wide: another thread compiling meanwhile sees it too). Covers `model.compile()`,
        `torch.compile(model)` and a model called in a compiled function (docs/numerics.md §12)."""
        config = torch._dynamo.config
        previous = config.skip_nnmodule_hook_guards
        config.skip_nnmodule_hook_guards = False  # by hand: config.patch(...) costs 4x as much per call
        try:
            return super().__call__(*args, **kwargs)
        finally:
            config.skip_nnmodule_hook_guards = previous

    def place(self, device_map: dict | None = None, n_devices: int | None = None) -> HookedDecoder:
        """Spread the model over devices: an explicit map ({"embed": ..., "blocks.3": "cuda:1", "ln_final": ...,
        "unembed": ...}, or accelerate's map of the HF model), or `n_devices` CUDA devices split evenly. Each part
        runs where it is placed. A map that would lose or never load weights raises ValueError before anything
        moves: "meta", "disk" (offload is chosen at load time: from_pretrained(dir, device_map=...)), parts whose
        weights are on meta (offloaded or never loaded), or a CUDA device this machine lacks."""
        from lens_det.devices import balanced_device_map, place

        if (device_map is None) == (n_devices is None):
            raise ValueError("pass exactly one of device_map and n_devices")
        if n_devices is not None:
            available = torch.cuda.device_count()
            if isinstance(n_devices, bool) or not isinstance(n_devices, int) or not 1 <= n_devices <= available:
                raise ValueError(f"n_devices={n_devices!r}, but this machine has {available} CUDA device(s); pass "
                                 "an int up to that, or a device_map such as {'blocks.0': 'cpu', '': 'cpu'}")
        place(self, device_map if device_map is not None else balanced_device_map(self.cfg.n_layers, n_devices))
        return self

    def generate(self, tokens, attention_mask=None, return_type: str | None = None, stop_at_eos: bool | None = None,
                 eos_token_id=None, use_past_kv_cache: bool | None = None, **kwargs):
        """Generate tokens; see `lens_det.generation.generate` for the options. Returns a GenerationOutput.

        TransformerLens spellings are mapped: a string / list of strings as input (tokenized left-padded),
        `return_type` "str" (decoded text, prompt included), "tokens" (ids), "input" (the input's kind) or None
        (GenerationOutput); `stop_at_eos=False` (stop_tokens=[]), `eos_token_id` (stop_tokens),
        `use_past_kv_cache` (use_kv_cache); `freq_penalty` has TransformerLens 2.x's meaning (it penalises the
        sampling logits; see generation.generate). Unlike TransformerLens, decoding is greedy unless
        do_sample=True, and freq_penalty, like the other sampling knobs, is refused without it."""
        from lens_det.generation import generate

        if return_type not in (None, "str", "tokens", "input"):
            raise ValueError(f"return_type must be None, 'str', 'tokens' or 'input', got {return_type!r}")
        single = isinstance(tokens, str)
        tokens, attention_mask, text = self._from_text(tokens, attention_mask)
        for tl_name, ours, value in (("eos_token_id", "stop_tokens", eos_token_id),
                                     ("use_past_kv_cache", "use_kv_cache", use_past_kv_cache)):
            if value is not None:
                if ours in kwargs:
                    raise ValueError(f"pass {tl_name} or {ours}, not both")
                kwargs[ours] = value
        if stop_at_eos is False:
            if eos_token_id is not None:
                raise ValueError("stop_at_eos=False and an eos_token_id contradict each other; drop one")
            kwargs["stop_tokens"] = []
        out = generate(self, tokens, attention_mask, **kwargs)
        if return_type == "tokens" or (return_type == "input" and not text):
            return out.tokens
        if return_type in ("str", "input"):
            strings = self.to_string(out.tokens, skip_special_tokens=True)
            return strings[0] if single else strings
        return out
    def set_use_attn_result(self, use: bool) -> None:
        """Fire `blocks.{i}.attn.hook_result` (per-head contributions [batch, pos, head, d_model]); off by
        default because it materialises n_heads copies of the residual stream."""
        for block in self.blocks:
            block.attn.use_attn_result = use

    def set_use_hook_mlp_in(self, use: bool) -> None:
        """Fire `blocks.{i}.hook_mlp_in` (ln2's input, a copy of resid_mid: an edit changes what the MLP reads, not
        the residual stream), as TransformerLens; off by default (one extra copy per layer)."""
        for block in self.blocks:
            block.use_hook_mlp_in = use

    def set_use_attn_in(self, use: bool) -> None:
        """Fire `blocks.{i}.hook_attn_in`: resid_pre copied per head [batch, pos, head_index, d_model], what head h's
        queries, keys and values read (through ln1), as TransformerLens; an edit changes only that head's input.
        Not with grouped-query attention (a key/value head serves several query heads): use
        set_use_split_qkv_input there. Off by default (n_heads copies of the residual stream per layer)."""
        if use and any(block.attn.n_rep > 1 for block in self.blocks):
            raise ValueError("hook_attn_in gives each query head its own input, but with grouped-query attention a "
                             "key/value head serves several query heads (TransformerLens refuses it too): use "
                             "model.set_use_split_qkv_input(True) (hook_q_input per query head, hook_k_input / "
                             "hook_v_input per key/value head)")
        self._set_per_head_inputs(use, "use_attn_in", "use_split_qkv_input")

    def set_use_split_qkv_input(self, use: bool) -> None:
        """Fire `blocks.{i}.hook_q_input` [batch, pos, head_index, d_model] and `hook_k_input` / `hook_v_input`
        [batch, pos, kv_head_index, d_model]: resid_pre copied per head, separately for queries, keys and values
        (TransformerLens's path patching into Q/K/V inputs). Off by default."""
        self._set_per_head_inputs(use, "use_split_qkv_input", "use_attn_in")

    def _set_per_head_inputs(self, use: bool, flag: str, other: str) -> None:
        if use and getattr(self.blocks[0], other):
            raise ValueError(f"{other} is on: hook_attn_in and hook_q/k/v_input are alternatives (with both, one "
                             f"would silently override the other's edits); call model.set_{other}(False) first")
        for block in self.blocks:
            setattr(block, flag, use)

    # --- forward ---
    def forward(
        self,
        tokens: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch all_pos"] | None = None,
        position_ids: PositionIds = None,
        kv_cache: KVCache | None = None,
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        logits_to_keep: int = 0,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        loss_per_token: bool = False,
        input_ids: Int[torch.Tensor, "batch pos"] | None = None,
        past_kv_cache: KVCache | None = None,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ):
        """Run the model.

        Args:
            tokens: token ids [batch, pos] (a 1-D tensor is one sequence), a string / list of strings, which
                are tokenized left-padded with their mask (and, for RoPE models, positions from the mask), or the
                (tokens, mask) pair model.to_tokens returns, which runs as its text would.
            attention_mask: 0/1 [batch, cached + pos]: everything the cache holds plus the new tokens. None
                means all new tokens are real (and, with a cache, the cached mask is kept). With nothing cached, a
                batch where some rows, but not all, start with the pad token (to_tokens' left padding) is refused
                without it: pass the mask, or torch.ones_like(tokens) if those leading tokens are real.
            position_ids: RoPE positions. None or "arange": arange(cached, cached + pos) for every row, what HF
                `forward` does. "mask": cumsum(mask) - 1 with pads at 0, what HF `generate` does, so a left-padded
                row equals its unpadded prompt. Or an explicit [batch or 1, pos] tensor. Ignored by ALiBi models,
                whose positions always come from the mask.
            kv_cache: a `KVCache` (from `model.new_cache()`); the new positions are appended to it.
            return_type: "logits", "loss" (mean next-token cross-entropy over real tokens), "both" or None.
            logits_to_keep: unembed only the last k positions (0: all), as HF's `logits_to_keep`; HF generate
                uses 1, and the logits of one row are rounded differently than those of all rows. With KV sharing
                (Gemma 4 E2B/E4B) the consumer layers then run on the last k positions only, as HF's eager
                `_maybe_slice_kv_shared_inputs` (so their hooks see k positions); per-hook comparisons use 0.
            stop_at_layer: as TransformerLens: run blocks [start, stop) and return the residual stream entering
                block `stop` ([batch, pos, d_model], blocks.{stop}.hook_resid_pre); negative counts from the end.
                Later hooks do not fire, so run_with_cache stops harvesting there.
            start_at_layer: as TransformerLens: the first argument is then the residual stream entering that
                block (e.g. a cached blocks.{k}.hook_resid_pre), not token ids.
            With either, a KV cache must be frozen (read only): a partial run cannot grow every layer's cache.
            loss_per_token: with a loss, return it per position [batch, pos - 1] (0 where a pair has a pad).
            input_ids: with start_at_layer on a model with per-layer embeddings (Gemma 4 E2B/E4B), the token ids of
                the residual stream's positions: every block also reads per-layer inputs made from them and their
                embedding (TransformerLens's `tokens` argument of start_at_layer).
            past_kv_cache: TransformerLens's name of kv_cache (a lens_det KVCache; pass one of the two).
            prepend_bos, padding_side: for text input, how model.to_tokens tokenizes it (TransformerLens's
                meaning; defaults True and "left"). Token ids run as they are, so with them these raise.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if logits_to_keep and return_type in ("loss", "both"):
            raise ValueError("the loss needs every position's logits; use logits_to_keep=0 with return_type='loss'")
        kv_cache = self._kv_cache(kv_cache, past_kv_cache)
        start, stop = self._layer_range(start_at_layer, stop_at_layer, kv_cache, return_type)
        pair = isinstance(tokens, TokensAndMask)
        tokens, attention_mask, text = self._from_text(tokens, attention_mask, prepend_bos, padding_side)
        if (text or pair) and position_ids is None:
            position_ids = "mask"
        resid = None
        if start_at_layer is not None:  # the input is a residual stream; token ids only give shape and device
            resid = self._check_residual(tokens)
            tokens = self._tokens_for_residual(resid, input_ids)
        elif input_ids is not None:
            raise ValueError("input_ids is only for start_at_layer (the first argument holds the token ids otherwise)")
        else:
            tokens = self._check_tokens(tokens)
        mask = self._full_mask(tokens, attention_mask, kv_cache)
        ctx = self._context(tokens, mask, position_ids, kv_cache)
        mode = ops.deterministic() if self.deterministic else contextlib.nullcontext()
        self.query_start = ctx.query_start
        try:
            with mode:
                logits = self._forward_layers(tokens, ctx, kv_cache, return_type, logits_to_keep, start, stop, resid)
        except BaseException:
            if kv_cache is not None:
                kv_cache._discard()
            raise
        if kv_cache is not None:
            kv_cache._discard() if kv_cache.frozen else kv_cache._commit(mask, tokens)
        if return_type in (None, "logits") or stop < self.cfg.n_layers:
            return logits
        loss = next_token_loss(logits, tokens, mask[:, -tokens.shape[1] :], per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _forward_layers(self, tokens, ctx, kv_cache, return_type, logits_to_keep, start, stop, resid):
        x = self.hook_embed(self.embed(tokens)) if resid is None else resid
        per_layer = self._per_layer_inputs(tokens, x if resid is None else self.embed(tokens))
        for i in range(start, stop):
            if i == self.kv_consumer_tail and stop == self.cfg.n_layers and 0 < logits_to_keep < x.shape[1] \
                    and self._can_cut_kv_tail(ctx, logits_to_keep):
                ctx, x = ctx.keep_last(logits_to_keep), x[:, -logits_to_keep:]  # HF's _maybe_slice_kv_shared_inputs
                self.query_start = ctx.query_start  # later hooks see the kept positions only (patch_hook reads it)
                per_layer = None if per_layer is None else per_layer[:, -logits_to_keep:]
            block = self.blocks[i]
            x = block(x.to(block.ln1.w.device), ctx, None if kv_cache is None else kv_cache.layers[i],
                      None if per_layer is None else per_layer[:, :, i])
        if stop < self.cfg.n_layers:
            return x
        x = self.ln_final(x.to(self.ln_final.w.device))
        return None if return_type is None else self.unembed(x[:, -logits_to_keep:] if logits_to_keep else x)

    def _can_cut_kv_tail(self, ctx, logits_to_keep: int) -> bool:
        """HF's _maybe_slice_kv_shared_inputs does not cut under sdpa when more than one position is kept and a layer
        type's mask is None (sdpa's is_causal then could not see the dropped queries). HF builds both layer types'
        masks, each sized against the first layer of its type (the first layer when the model has none)."""
        if self.attn_implementation != "sdpa" or logits_to_keep <= 1 or ops.is_deterministic():
            return True
        masks = []
        for window in (None, self.config.sliding_window):
            kind = "full_attention" if window is None else "sliding_attention"
            layer = next((i for i, t in enumerate(self.config.layer_types) if t == kind), 0)
            start, n_key = self._mask_sizes(ctx, layer)
            masks.append(ctx.sdpa_mask(start, n_key, window, ctx.mask.device))
        return all(m is not None for m in masks)

    def _mask_sizes(self, ctx, layer: int) -> tuple[int, int]:
        """(key_start, n_key) layer `layer` attends over in this call (HF's cache get_mask_sizes)."""
        total = ctx.query_start + ctx.n_query
        window = self.blocks[layer].attn.window
        if window is None or ctx.query_start < window:
            return 0, total
        return ctx.query_start - window + 1, window - 1 + ctx.n_query

    def _per_layer_inputs(self, tokens, embedding):
        """Gemma 4's per-layer embeddings [batch, pos, n_layers, d_per_layer_input] (None without them)."""
        if not self.config.d_per_layer_input:
            return None
        return self.hook_per_layer_inputs(self.ple(tokens, embedding))

    def input_to_embed(self, input, attention_mask=None, past_kv_cache=None):
        """As TransformerLens 2.x: (residual stream entering block 0 [batch, pos, d_model], tokens, None (no
        shortformer positional embedding), attention_mask); hook_embed fires. Feed the residual back with
        model(residual, start_at_layer=0, attention_mask=mask) (plus input_ids=tokens on a model with per-layer
        embeddings). A string input is tokenized left-padded, and its mask returned."""
        if past_kv_cache is not None:
            raise ValueError("input_to_embed does not read a KV cache here (the embedding does not depend on it); "
                             "drop past_kv_cache and pass the cache to forward")
        tokens, attention_mask, _ = self._from_text(input, attention_mask)
        tokens = self._check_tokens(tokens)
        return self.hook_embed(self.embed(tokens)), tokens, None, attention_mask

    def _from_text(self, tokens, attention_mask, prepend_bos=None, padding_side=None):
        """A string or list of strings -> (tokens, their mask, True), tokenized by to_tokens (left-padded by
        default); to_tokens' (tokens, mask) pair -> (tokens, mask, False); token ids pass through."""
        if isinstance(tokens, (list, tuple)) and not tokens:
            raise ValueError("no prompts (an empty list): pass at least one string, or token ids [batch, pos]")
        if not (isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and isinstance(tokens[0], str))):
            given = [n for n, v in (("prepend_bos", prepend_bos), ("padding_side", padding_side)) if v is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} apply to text input (model.to_tokens reads them); token ids "
                                 f"run as they are: drop {' and '.join(given)}, and give the padding as "
                                 "attention_mask=mask")
            if isinstance(tokens, TokensAndMask):
                if attention_mask is not None:
                    raise ValueError("the (tokens, mask) pair from model.to_tokens carries its own mask: pass the "
                                     "pair alone, or `tokens, mask = pair` and attention_mask=...")
                return (*tokens, False)
            return tokens, attention_mask, False
        if attention_mask is not None:
            raise ValueError("strings come with their own mask; pass token ids to give an attention_mask")
        return (*self.to_tokens(tokens, padding_side=padding_side, prepend_bos=prepend_bos), True)

    def _layer_range(self, start_at_layer, stop_at_layer, kv_cache, return_type) -> tuple[int, int]:
        n = self.cfg.n_layers

        def index(value, name):
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or not -n <= value <= n:
                raise ValueError(f"{name} must be an int in [-{n}, {n}], got {value!r}")
            return value % n if value < 0 else value

        start, stop = index(start_at_layer, "start_at_layer") or 0, index(stop_at_layer, "stop_at_layer")
        stop = n if stop is None else stop
        if start >= stop and stop_at_layer is not None:
            raise ValueError(f"start_at_layer {start} must come before stop_at_layer {stop}")
        skipped = sorted({j for i in range(start, stop) if (j := self.config.layer_kv_source(i)) is not None
                          and j < start})
        if skipped:
            raise ValueError(f"start_at_layer={start} skips layer(s) {skipped}, whose keys/values later layers attend to "
                             "(KV sharing), so they cannot run from a residual stream alone; start at or before "
                             f"layer {skipped[0]}")
        partial = start_at_layer is not None or stop_at_layer is not None
        if partial and kv_cache is not None and not kv_cache.frozen:
            raise ValueError("start_at_layer/stop_at_layer run only some layers, which cannot grow the KV cache of "
                             "every layer; pass kv_cache.freeze() (read only) or no cache")
        if partial and return_type in ("loss", "both"):
            raise ValueError("the loss needs the whole model run from token ids; drop start_at_layer/stop_at_layer")
        return start, stop

    def _tokens_for_residual(self, resid, input_ids) -> torch.Tensor:
        """start_at_layer: the token ids behind the residual stream (per-layer embeddings need them), else zeros
        that only give shape and device."""
        if input_ids is None:
            if self.config.d_per_layer_input:
                raise ValueError("this model has per-layer embeddings, which every block reads from the token ids: "
                                 "with start_at_layer pass input_ids=<the tokens of the residual's positions>")
            return torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)
        ids = self._check_tokens(input_ids)
        if ids.shape != resid.shape[:2]:
            raise ValueError(f"input_ids has shape {tuple(ids.shape)} but the residual stream has "
                             f"{tuple(resid.shape[:2])} positions")
        return ids

    def _check_residual(self, resid) -> torch.Tensor:
        if not isinstance(resid, torch.Tensor) or not resid.is_floating_point():
            raise TypeError("with start_at_layer the first argument is the residual stream [batch, pos, d_model] "
                            f"(a float tensor), got {type(resid).__name__}")
        resid = resid[None] if resid.ndim == 2 else resid
        if resid.ndim == 3 and resid.shape[0] == 0:
            raise ValueError(f"a batch of 0 rows (a residual stream of shape {tuple(resid.shape)}): pass at least one")
        if resid.ndim != 3 or resid.shape[-1] != self.cfg.d_model or resid.shape[1] == 0:
            raise ValueError(f"the residual stream must have shape [batch, pos, {self.cfg.d_model}], got "
                             f"{tuple(resid.shape)}")
        return resid

    def _check_tokens(self, tokens) -> torch.Tensor:
        if isinstance(tokens, TokensAndMask):
            raise TypeError(TO_TOKENS_IDIOM)
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of token ids, got {type(tokens).__name__}; "
                            "use model.to_tokens(text) for strings")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}; pass tokens.long()")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape [batch, pos] with pos >= 1, got {tuple(tokens.shape)}")
        if tokens.shape[0] == 0:
            raise ValueError(f"a batch of 0 prompts (tokens of shape {tuple(tokens.shape)}): pass at least one row")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.d_vocab):
            bad = tokens[(tokens < 0) | (tokens >= self.config.d_vocab)][0].item()
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {self.config.d_vocab}); "
                "check that the tokenizer belongs to this model"
            )
        return tokens.to(self.embed.W_E.device)

    @staticmethod
    def _kv_cache(kv_cache, past_kv_cache) -> KVCache | None:
        """kv_cache, or past_kv_cache (TransformerLens's name for it); either must be a lens_det KVCache."""
        if past_kv_cache is not None:
            if kv_cache is not None:
                raise ValueError("pass kv_cache or past_kv_cache (TransformerLens's name for it), not both")
            kv_cache = past_kv_cache
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise TypeError(f"the KV cache must be a lens_det KVCache, got {type(kv_cache).__name__}: pass "
                            "kv_cache=model.new_cache() (a TransformerLens HookedTransformerKeyValueCache / "
                            "TransformerLensKeyValueCache holds another layout, which lens_det does not read)")
        return kv_cache

    def _refuse_unmasked_left_padding(self, tokens) -> None:
        """With no mask and nothing cached: a batch where some rows, but not all, start with the pad token is
        what to_tokens' left padding makes, and run unmasked it would attend to the pads, so it is refused (the
        longest row of a padded batch has no pad). Nothing is inferred: a real token may equal the pad id (a
        BOS-less row), and a pad id equal to BOS cannot be told from it."""
        tok = self.tokenizer
        if tok is None:
            pad, bos = self.config.pad_token_id, self.config.bos_token_id
        else:  # what to_tokens pads with
            pad, bos = (tok.pad_token_id if tok.pad_token is not None else tok.eos_token_id), tok.bos_token_id
        if tokens.shape[0] < 2 or pad is None or pad == bos:
            return
        starts_with_pad = tokens[:, 0] == pad
        if starts_with_pad.any() and not starts_with_pad.all():
            rows = starts_with_pad.nonzero().flatten().tolist()
            raise ValueError(
                f"row(s) {rows} of this batch start with the pad token (id {pad}) and the others do not: a "
                "left-padded batch, which without its mask would attend to the pads. Pass attention_mask=mask "
                "(`tokens, mask = model.to_tokens(texts)`), or the pair model.to_tokens returns, or the texts "
                "themselves; if those leading tokens are real, pass attention_mask=torch.ones_like(tokens)"
            )

    def _full_mask(self, tokens, attention_mask, kv_cache) -> torch.Tensor:
        batch, n_new = tokens.shape
        past = 0
        if kv_cache is not None:
            if kv_cache.config != self.config:
                raise ValueError("kv_cache was made for a model with a different config; use model.new_cache()")
            if kv_cache.batch_size is not None and kv_cache.batch_size != batch:
                raise ValueError(
                    f"tokens have batch size {batch} but the cache holds batch size {kv_cache.batch_size}; "
                    "use a new cache (model.new_cache()) or the same batch"
                )
            cached = next((e.keys for e in kv_cache.layers if e.keys is not None), None)  # consumers: None
            if cached is not None and cached.dtype != self.embed.W_E.dtype:
                raise ValueError(f"the cache holds {cached.dtype} but the model runs in {self.embed.W_E.dtype}; "
                                 "use a new cache after changing the model dtype")
            past = kv_cache.length
            if kv_cache.max_length is not None and past + n_new > kv_cache.max_length:
                raise ValueError(
                    f"the cache holds {past} tokens and {n_new} more would exceed its max_length "
                    f"{kv_cache.max_length}; use a larger max_length or a new cache"
                )
        device = tokens.device
        if attention_mask is None:
            if past == 0:
                self._refuse_unmasked_left_padding(tokens)
            new = torch.ones(batch, n_new, dtype=torch.long, device=device)
            return new if past == 0 else torch.cat([kv_cache.mask.to(device), new], dim=1)
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.shape != (batch, past + n_new):
            extra = f"the cache holds {past} tokens plus {n_new} new ones; " if past else ""
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but {extra}tokens need "
                f"{(batch, past + n_new)}: pass the mask for all {past + n_new} positions"
            )
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 (pad) and 1 (real token)")
        mask = attention_mask.to(device=device, dtype=torch.long)
        if past and not torch.equal(mask[:, :past], kv_cache.mask.to(device)):
            raise ValueError(
                "attention_mask disagrees with the mask the cache was built with on the cached positions; "
                "pass the same history (cache.mask) followed by the new tokens' mask"
            )
        return mask

    def _context(self, tokens, mask, position_ids, kv_cache) -> ForwardContext:
        past = 0 if kv_cache is None else kv_cache.length
        n_new = tokens.shape[1]
        if self.config.positional == "alibi":
            positions = None
        elif position_ids is None or (isinstance(position_ids, str) and position_ids == "arange"):
            positions = torch.arange(past, past + n_new, device=tokens.device)[None]
        elif isinstance(position_ids, str) and position_ids == "mask":
            positions = positions_from_mask(mask)[:, past:]
        elif isinstance(position_ids, torch.Tensor):
            if position_ids.ndim != 2 or position_ids.shape[1] != n_new or position_ids.shape[0] not in (1, len(tokens)):
                raise ValueError(f"position_ids must have shape [{len(tokens)} or 1, {n_new}], "
                                 f"got {tuple(position_ids.shape)}")
            positions = position_ids.to(tokens.device)
        else:
            raise ValueError(f"position_ids must be None, 'arange', 'mask' or a tensor, got {position_ids!r}")
        return ForwardContext(mask, past, n_new, self.embed.W_E.dtype, positions)

    # --- TransformerLens conveniences ---
    def disabled_hook_points(self) -> dict[str, str]:
        """Hook points that do not fire with the current settings, each with the call that switches it on."""
        off = {}
        for i, block in enumerate(self.blocks):
            if not block.attn.use_attn_result:
                off[f"blocks.{i}.attn.hook_result"] = "model.set_use_attn_result(True)"
            if not block.use_hook_mlp_in:
                off[f"blocks.{i}.hook_mlp_in"] = "model.set_use_hook_mlp_in(True)"
            if not block.use_attn_in:
                off[f"blocks.{i}.hook_attn_in"] = "model.set_use_attn_in(True)"
            if not block.use_split_qkv_input:
                off |= {f"blocks.{i}.hook_{x}_input": "model.set_use_split_qkv_input(True)" for x in "qkv"}
        return off

    # One rule for add_hook, run_with_hooks and hooks(): a hook by exact name must name a hook point that fires with
    # the current settings (else ValueError: the close names, or the switch to call); a filter function matches
    # only the hook points that fire, so "every hook" never trips over an opt-in one that is off.
    def check_hooks_to_add(self, hook_point, hook_point_name: str, hook, dir="fwd", is_permanent=False,
                           prepend=False) -> None:
        """A hook on a hook point that does not fire would silently do nothing: refuse it (as TransformerLens)."""
        switch = self.disabled_hook_points().get(hook_point_name)
        if switch is not None:
            raise ValueError(f"{hook_point_name} does not fire with the current settings, so this hook would never "
                             f"run; call {switch} first")

    def add_hook(self, name, hook, dir="fwd", is_permanent=False, level=None, prepend=False) -> None:
        """TransformerLens's add_hook under the rule above: an exact name is checked, a filter function skips the
        hook points that do not fire (model.disabled_hook_points())."""
        if isinstance(name, str):
            if name not in self.hook_dict:
                raise ValueError(unknown_hook_message(name, self.hook_dict))
            super().add_hook(name, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)
            return
        off = self.disabled_hook_points()

        def fires_and_matches(hook_name: str) -> bool:
            return hook_name not in off and name(hook_name)

        super().add_hook(fires_and_matches, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def _enable_hook_with_name(self, name: str, hook, dir):  # hooks() / run_with_hooks with a hook name
        if name not in self.mod_dict:
            raise ValueError(unknown_hook_message(name, self.hook_dict))
        self.check_hooks_to_add(self.mod_dict.get(name), name, hook, dir=dir)
        super()._enable_hook_with_name(name, hook, dir)

    def _enable_hooks_for_points(self, hook_points, enabled, hook, dir):  # a names filter: skip what never fires
        off = self.disabled_hook_points()
        super()._enable_hooks_for_points([(n, p) for n, p in hook_points if n not in off], enabled, hook, dir)

    def get_caching_hooks(self, names_filter=None, incl_bwd: bool = False, device=None,
                          remove_batch_dim: bool = False, cache: dict | None = None, pos_slice=None):
        """TransformerLens's caching hooks, with `pos_slice` applied on each hook's position axis (TL picks the
        axis from the hook name, which would slice the head axis of hook_rot_q/k and the q/k norms)."""
        from transformer_lens.utilities import Slice

        pos_slice = Slice.unwrap(pos_slice)
        cache, fwd, bwd = super().get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        off = self.disabled_hook_points()  # they never fire: no caching hook (and no error) for them
        fwd, bwd = [(n, fn) for n, fn in fwd if n not in off], [(n, fn) for n, fn in bwd if n not in off]
        if pos_slice.mode == "identity":
            return cache, fwd, bwd
        shift = 1 if remove_batch_dim else 0

        def sliced(save, suffix):
            def hook(tensor, hook):
                save(tensor, hook)
                key = hook.name + suffix
                cache[key] = pos_slice.apply(cache[key], dim=position_dim(hook.name) - shift)
            return hook

        return (cache, [(n, sliced(fn, "")) for n, fn in fwd], [(n, sliced(fn, "_grad")) for n, fn in bwd])

    def run_with_cache(self, *model_args, remove_batch_dim: bool = False, **kwargs):
        """Run and return (output, a transformer_lens.ActivationCache of every hook point)."""
        out, cache_dict = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        return out, LensActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    def why_residual_not_additive(self) -> str | None:
        """None when every head's result and every neuron's output is added to the residual stream as it is (so TL's
        per-head / per-neuron decompositions sum to it); otherwise why not."""
        c = self.config
        if c.layer_scalar:
            return ("each block multiplies the whole residual stream by its layer_scalar, so the residual stream is not "
                    "embed + the sum of the attention and MLP outputs")
        if c.post_attn_norm or c.post_mlp_norm:
            return ("the attention and MLP outputs pass through a norm (ln1_post / ln2_post) before the residual add, "
                    "so per-head results and per-neuron outputs do not sum to the residual stream")
        if c.d_per_layer_input:
            return ("each block also adds its per-layer-embedding sub-block's output (hook_ple_out), so the residual "
                    "stream is not embed + the sum of the attention and MLP outputs")
        if c.residual_from_norm:
            return ("the residual branch starts from ln1/ln2's output (residual_from_norm), so the residual stream is "
                    "not embed + the sum of the attention and MLP outputs")
        return None

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """As TransformerLens: the sum of b_O (and b_out) of the blocks before `layer` (plus block `layer`'s b_O
        with mlp_input), [d_model]; zeros for families without biases."""
        n = self.cfg.n_layers
        if not 0 <= layer <= n or (mlp_input and layer == n):
            raise ValueError(f"layer must be in [0, {n}] ([0, {n - 1}] with mlp_input), got {layer}")
        total = torch.zeros(self.cfg.d_model, device=self.cfg.device, dtype=self.cfg.dtype)
        for i in range(layer + (1 if mlp_input else 0)):
            total = total + self.blocks[i].attn.b_O.to(total.device)
            if include_mlp_biases and i < layer and self.blocks[i].mlp.b_out is not None:
                total = total + self.blocks[i].mlp.b_out.to(total.device)
        return total

    def tl_parameters(self) -> dict[str, torch.Tensor]:
        """The weights under TransformerLens's names and shapes ("blocks.0.attn.W_V", "blocks.0.ln2.w",
        "unembed.W_U", ...), what TL tools such as SVDInterpreter read. Norm weights are raw: Gemma's RMSNorm gain
        is 1 + w (cfg.rmsnorm_uses_offset says so)."""
        params = {"embed.W_E": self.W_E, "unembed.W_U": self.W_U, "unembed.b_U": self.b_U}
        for i, block in enumerate(self.blocks):
            own_kv = block.attn.kv_source is None  # KV-sharing consumers have no K/V weights
            for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
                if own_kv or name[-1] not in "KV":
                    params[f"blocks.{i}.attn.{name}"] = getattr(block.attn, name)
            params[f"blocks.{i}.mlp.W_in"], params[f"blocks.{i}.mlp.W_out"] = block.mlp.W_in, block.mlp.W_out
            if self.cfg.gated_mlp:
                params[f"blocks.{i}.mlp.W_gate"] = block.mlp.W_gate
        norms = [(f"blocks.{i}.{n}", getattr(b, n)) for i, b in enumerate(self.blocks) for n in ("ln1", "ln2")]
        for prefix, norm in norms + [("ln_final", self.ln_final)]:
            params |= {f"{prefix}.{attr}": getattr(norm, attr) for attr in ("w", "b") if hasattr(norm, attr)}
        return params

    @property
    def adapter(self):
        """What TL 4's logit lens reads to apply the post-unembedding transform (the final soft-cap)."""
        return SimpleNamespace(apply_output_logits_transform=self.unembed.final_cap)

    @property
    def all_head_labels(self) -> list[str]:
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def to_tokens(self, text: str | list[str], padding_side: Literal["left", "right"] | None = "left",
                  prepend_bos: bool | None = True):
        """Tokenize with the model's tokenizer: returns (tokens [batch, pos], attention_mask [batch, pos]), a
        TokensAndMask pair. None means the default (left padding, BOS prepended), as TransformerLens passes it."""
        if self.tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        prepend_bos = True if prepend_bos is None else prepend_bos  # TL tools pass None for "the default"
        padding_side = "left" if padding_side is None else padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no prompts (an empty list): to_tokens needs at least one string")
        tok, side, pad = self.tokenizer, self.tokenizer.padding_side, self.tokenizer.pad_token
        try:  # leave the tokenizer as it was
            tok.padding_side = padding_side
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=prepend_bos)
        finally:
            tok.padding_side, tok.pad_token = side, pad
        return TokensAndMask((enc["input_ids"].to(self.cfg.device), enc["attention_mask"].to(self.cfg.device)))

    def to_string(self, tokens, skip_special_tokens: bool = False) -> str | list[str]:
        if self.tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2:
            return self.tokenizer.batch_decode(tokens, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def set_tokenizer(self, tokenizer) -> None:
        """Attach a tokenizer (e.g. transformers.AutoTokenizer.from_pretrained(name)), as TransformerLens."""
        self.tokenizer = tokenizer

    def to_str_tokens(self, input, prepend_bos: bool = True) -> list[str] | list[list[str]]:
        """Each token as its string, as TransformerLens: a string or 1-D ids -> list[str]; a list of strings or
        2-D ids -> one list per row (a 2-D batch of one row -> list[str])."""
        if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(text, prepend_bos) for text in input]
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)[0][0]
        ids = torch.as_tensor(input)
        if ids.ndim == 2:
            return self.to_str_tokens(ids[0]) if ids.shape[0] == 1 else [self.to_str_tokens(row) for row in ids]
        if self.tokenizer is None:
            raise ValueError(NO_TOKENIZER)
        return [self.tokenizer.decode([int(t)]) for t in ids]

    def get_token_position(self, single_token: str | int, input, mode: Literal["first", "last"] = "first",
                           prepend_bos: bool = True) -> int:
        """Index of `single_token` in `input` (a string, or ids of one sequence), as TransformerLens."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        ids = self.to_tokens(input, prepend_bos=prepend_bos)[0][0] if isinstance(input, str) else torch.as_tensor(input)
        if ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence, got a batch of {ids.shape[0]}")
            ids = ids[0]
        where = (ids == token).nonzero().flatten()
        if where.numel() == 0:
            raise ValueError(f"token {single_token!r} ({token}) is not in the input")
        return int(where[0 if mode == "first" else -1])

    def to_single_token(self, text: str) -> int:
        tokens, _ = self.to_tokens(text, prepend_bos=False)
        if tokens.shape[1] != 1:
            raise ValueError(f"{text!r} is {tokens.shape[1]} tokens, not one")
        return int(tokens[0, 0])

    def tokens_to_residual_directions(self, tokens):
        """Directions [..., d_model] in the normalised residual stream whose dot product is a token's logit
        (before the final soft-cap): W_U's column times ln_final's gain, i.e. what TransformerLens's W_U holds
        after fold_ln. ActivationCache.logit_attrs multiplies each ln-scaled component by this, so the parts of
        decompose_resid sum to the logit (difference); a LayerNorm's bias adds `final_norm_bias_logits`."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        gained = self.W_U * self.final_norm_gain()[:, None]
        if isinstance(tokens, int):
            return gained[:, tokens]
        tokens = torch.as_tensor(tokens, device=gained.device)
        return gained[:, tokens].movedim(0, -1)

    def final_norm_gain(self) -> torch.Tensor:
        """ln_final's elementwise gain [d_model] in float32: w (LayerNorm, RMSNorm) or 1 + w (Gemma's RMSNorm)."""
        ln = self.ln_final
        return 1.0 + ln.w.float() if getattr(ln, "unit_offset", False) else ln.w.float()

    def final_norm_bias_logits(self) -> torch.Tensor:
        """[d_vocab]: the logits ln_final's bias alone adds (zeros for RMSNorm); TL's fold_ln puts them in b_U.
        No residual component carries them, so DLA parts sum to the logit minus this."""
        bias = getattr(self.ln_final, "b", None)
        return torch.zeros(self.cfg.d_vocab) if bias is None else bias.float() @ self.W_U.float()


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                    per_token: bool = False) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from position t, over pairs where both are real tokens (or, per
    token, [batch, pos - 1] with 0 where a pair has a pad)."""
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]
    keep = (mask[:, 1:] * mask[:, :-1]).to(nll.dtype)
    return nll * keep if per_token else (nll * keep).sum() / keep.sum().clamp(min=1)
