"""LensConfig: the architecture of a model, named by mechanism rather than by model family.

Runtime options (device, dtype, deterministic mode) are not part of it; see `HookedDecoder`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

# The named configs moved to lens_det.presets; these names stay importable from here.
from lens_det.presets import hf_config_from_name, named_configs, resolve_name  # noqa: F401

LayerType = Literal["full_attention", "sliding_attention"]


@dataclass(frozen=True)
class LensConfig:
    """Architecture of a hooked decoder.

    Field names follow TransformerLens where one exists (n_layers, d_model, n_heads, d_head, d_mlp, d_vocab,
    n_key_value_heads), so `transformer_lens.ActivationCache` and `transformer_lens.patching` can read them.
    Every other field names a mechanism; the model resolves each one once, in `__init__`.
    """

    architecture: str  # the HF model_type this came from (the model never dispatches on it; converters do)
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_key_value_heads: int
    positional: Literal["alibi", "rope"]
    norm: Literal["layernorm", "rmsnorm"]
    norm_eps: float
    attn_scale: float  # multiplies Q @ K^T (the exact Python float HF uses)
    act_fn: Literal["bloom_gelu", "gelu_tanh", "gelu_erf"]
    gated_mlp: bool
    layer_types: tuple[LayerType, ...]
    rmsnorm_unit_offset: bool = False  # RMSNorm multiplies by (1 + w) (Gemma 1-3)
    # How RMSNorm forms 1 / sqrt(mean(x^2) + eps) in fp32: torch.rsqrt (Gemma 1-3) or torch.pow(., -0.5) (Gemma 4)
    rmsnorm_inv_sqrt: Literal["rsqrt", "pow"] = "rsqrt"
    embed_norm: bool = False  # LayerNorm right after the embedding (Bloom)
    embed_scale: bool = False  # multiply embeddings by sqrt(d_model) cast to the weight dtype (Gemma)
    post_attn_norm: bool = False  # norm on the attention output before the residual add (Gemma 2/3)
    post_mlp_norm: bool = False  # norm on the MLP output before the residual add (Gemma 2/3)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Gemma 3, 4)
    v_norm: bool = False  # per-head RMSNorm without a weight on v (Gemma 4)
    attn_softcap: float | None = None  # tanh(s / cap) * cap on attention scores, before the mask
    final_softcap: float | None = None  # tanh(l / cap) * cap on the logits
    fused_qkv: bool = False  # one projection laid out per head as [q | k | v] (Bloom)
    attn_bias: bool = False
    mlp_bias: bool = False
    residual_from_norm: bool = False  # the residual branch starts from the norm output (Bloom's flag)
    sliding_window: int | None = None  # keys visible iff 0 <= i - j < sliding_window (padded indices)
    rope_theta: tuple[float, ...] | None = None  # per layer
    rope_linear_factor: tuple[float, ...] | None = None  # per layer; inv_freq is divided by it
    # per layer (None: 1.0 everywhere): the fraction of frequency pairs that rotate, HF's "proportional" RoPE
    # (Gemma 4 full layers): int(f * d_head // 2) pairs with exponents over the full d_head, the rest inv_freq 0
    # (cos 1, sin 0: those dimensions pass unrotated). 1.0 is ordinary RoPE.
    rope_rotary_fraction: tuple[float, ...] | None = None
    # Per-layer attention geometry (None: d_head / n_key_value_heads on every layer). Gemma 4's full-attention layers
    # have their own head dim and kv-head count; d_head and n_key_value_heads then describe the other layers, and
    # q/k/v/z/o shapes of a layer follow `layer_d_head(i)` / `layer_n_key_value_heads(i)`.
    d_head_per_layer: tuple[int, ...] | None = None
    n_key_value_heads_per_layer: tuple[int, ...] | None = None
    # per layer (None: no layer): the layer has no v projection; its values are the k projection's output, taken
    # before k_norm and RoPE (Gemma 4's attention_k_eq_v on full layers). v_norm still applies to them.
    k_eq_v: tuple[bool, ...] | None = None
    layer_scalar: bool = False  # each block multiplies its output (the whole residual stream) by a learned scalar
    # Per-layer embeddings (Gemma 4 E2B/E4B "PLE"; 0: none): width of each layer's extra input. A packed token table
    # [d_vocab_per_layer_input, n_layers * d_per_layer_input] plus a projection of the embedding give every block
    # its own [batch, pos, d_per_layer_input] input, which gates a third residual sub-block at the block's end.
    d_per_layer_input: int = 0
    d_vocab_per_layer_input: int | None = None
    # per layer (None: no sharing): the earlier layer whose keys and values (after its cache update: past + new) this
    # layer attends to instead of projecting its own (Gemma 4's num_kv_shared_layers; None for layers that project
    # their own). Such "consumer" layers have no k/v projections, k/v norms or cache entry.
    kv_source_layer: tuple[int | None, ...] | None = None
    # per layer (None: d_mlp everywhere): the MLP width of each layer (Gemma 4's use_double_wide_mlp doubles it on
    # KV-sharing consumer layers)
    d_mlp_per_layer: tuple[int, ...] | None = None
    # Mixture of experts beside the dense MLP (Gemma 4's enable_moe_block; 0: none). Every block then runs the dense
    # MLP and a routed MoE on the same residual (each branch with its own post-norm), adds the two branches and
    # applies the usual post-MLP norm. The router reads the un-normed residual: a weightless RMSNorm, times a learned
    # scale and d_model**-0.5, a linear layer, softmax in fp32, top `n_experts_per_token`, renormalised, times a
    # learned per-expert scale (docs/numerics.md §6.11).
    n_experts: int = 0
    n_experts_per_token: int = 0  # TransformerLens's name for top-k
    d_mlp_expert: int = 0  # each expert's gated-MLP width (HF moe_intermediate_size)
    # AltUp (Gemma 3n; 1: one residual stream): the residual is n_streams parallel streams [stream, batch, pos, d]; each
    # block predicts all of them from a learned per-token mix, computes on stream 0's prediction, and corrects every
    # stream by the innovation; the streams come from projections of the embedding and are averaged before ln_final
    n_streams: int = 1
    altup_correct_scale: bool = False  # the per-layer gate reads corrected stream 0 times a learned [d] scale
    laurel_rank: int = 0  # LAuReL (Gemma 3n): a low-rank residual beside attention; (x + attn + laurel) / sqrt(2)
    # per layer (None: no layer): gaussian top-k sparsity of the gated MLP's gate, relu(g - (mean + std * icdf(p)))
    gate_sparsity: tuple[float, ...] | None = None
    per_layer_oov_to_zero: bool = False  # per-layer table: ids >= d_vocab_per_layer_input read row 0 (Gemma 3n)
    # the per-layer scales and AltUp's router scale are model-dtype tensors (Gemma 3n's buffers), not Python floats
    scales_in_model_dtype: bool = False
    # with logits_to_keep, the KV-sharing tail runs on the kept positions only (Gemma 4's _maybe_slice_kv_shared_inputs;
    # Gemma 3n has no such cut)
    cut_kv_tail: bool = True
    # nn.Embedding's padding_idx (HF's Gemma embeddings): that row's gradient is zero (the forward is unchanged)
    embed_padding_idx: int | None = None
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    hf_architecture: str | None = None  # the HF class name of the checkpoint (e.g. Gemma3ForConditionalGeneration)
    n_ctx: int | None = None  # context length it was trained for (HF max_position_embeddings); not enforced

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.n_layers <= 0 or self.n_heads <= 0 or self.d_head <= 0:
            raise ValueError(f"d_model, n_layers, n_heads and d_head must be positive: {self}")
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not a multiple of n_key_value_heads={self.n_key_value_heads}"
            )
        if self.fused_qkv and self.n_key_value_heads != self.n_heads:
            raise ValueError("fused_qkv (Bloom layout) needs n_key_value_heads == n_heads")
        if self.rmsnorm_inv_sqrt not in ("rsqrt", "pow"):
            raise ValueError(f"rmsnorm_inv_sqrt must be 'rsqrt' or 'pow', got {self.rmsnorm_inv_sqrt!r}")
        if self.positional not in ("alibi", "rope"):
            raise ValueError(f"positional must be 'alibi' or 'rope', got {self.positional!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        per_layer = {"layer_types": self.layer_types}
        if self.positional == "rope":
            if self.rope_theta is None or self.rope_linear_factor is None:
                raise ValueError("positional='rope' needs rope_theta and rope_linear_factor (one per layer)")
            per_layer |= {"rope_theta": self.rope_theta, "rope_linear_factor": self.rope_linear_factor}
        elif self.rope_rotary_fraction is not None:
            raise ValueError("rope_rotary_fraction needs positional='rope'")
        optional = {"rope_rotary_fraction": self.rope_rotary_fraction, "d_head_per_layer": self.d_head_per_layer,
                    "n_key_value_heads_per_layer": self.n_key_value_heads_per_layer, "k_eq_v": self.k_eq_v,
                    "kv_source_layer": self.kv_source_layer, "d_mlp_per_layer": self.d_mlp_per_layer,
                    "gate_sparsity": self.gate_sparsity}
        per_layer |= {name: values for name, values in optional.items() if values is not None}
        for name, values in per_layer.items():
            if len(values) != self.n_layers:
                raise ValueError(f"{name} has {len(values)} entries but n_layers is {self.n_layers}")
        for i in range(self.n_layers):
            d, h_kv = self.layer_d_head(i), self.layer_n_key_value_heads(i)
            if d <= 0 or h_kv <= 0 or self.n_heads % h_kv:
                raise ValueError(f"layer {i}: d_head={d} must be positive and n_key_value_heads={h_kv} must divide "
                                 f"n_heads={self.n_heads}")
        if self.fused_qkv and (self.d_head_per_layer or self.n_key_value_heads_per_layer or self.k_eq_v):
            raise ValueError("fused_qkv (Bloom layout) has one geometry for every layer and a v projection")
        if self.rope_rotary_fraction and any(not 0.0 <= f <= 1.0 for f in self.rope_rotary_fraction):
            raise ValueError(f"rope_rotary_fraction values must be in [0, 1], got {self.rope_rotary_fraction}")
        self._check_kv_sharing()
        if self.d_per_layer_input < 0 or (self.d_per_layer_input and not self.d_vocab_per_layer_input):
            raise ValueError("d_per_layer_input must be >= 0, and per-layer embeddings need d_vocab_per_layer_input")
        if self.d_mlp_per_layer and any(d <= 0 for d in self.d_mlp_per_layer):
            raise ValueError(f"d_mlp_per_layer values must be positive, got {self.d_mlp_per_layer}")
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise NotImplementedError(f"layer_types {sorted(unknown)} are not implemented")
        if self.n_experts and not 0 < self.n_experts_per_token <= self.n_experts:
            raise ValueError(f"n_experts_per_token must be in 1..n_experts={self.n_experts}, got "
                             f"{self.n_experts_per_token}")
        if self.n_experts and (self.d_mlp_expert <= 0 or not self.gated_mlp or self.norm != "rmsnorm"):
            raise ValueError("a mixture of experts needs d_mlp_expert > 0, gated_mlp and rmsnorm (Gemma 4's block)")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")

    def _check_kv_sharing(self) -> None:
        """A consumer reads an earlier layer of the same type and geometry that projects its own keys/values."""
        for i in range(self.n_layers):
            j = self.layer_kv_source(i)
            if j is None:
                continue
            if not 0 <= j < i or self.layer_kv_source(j) is not None:
                raise ValueError(f"kv_source_layer[{i}]={j} must be an earlier layer with its own k/v projections")
            same = (self.layer_types[j], self.layer_d_head(j), self.layer_n_key_value_heads(j)) == \
                (self.layer_types[i], self.layer_d_head(i), self.layer_n_key_value_heads(i))
            if not same:
                raise ValueError(f"layer {i} shares the keys/values of layer {j}, which differs in layer type, d_head "
                                 "or kv heads")
            if self.fused_qkv or self.positional != "rope":
                raise ValueError("kv_source_layer needs split q/k/v projections and RoPE")

    # --- TransformerLens field names read by ActivationCache and transformer_lens.patching ---
    @property
    def normalization_type(self) -> str:
        return "LN" if self.norm == "layernorm" else "RMS"

    @property
    def final_rms(self) -> bool:
        return self.norm == "rmsnorm"

    @property
    def attn_only(self) -> bool:
        return False

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (1 without GQA/MQA)."""
        return self.n_heads // self.n_key_value_heads

    # --- per-layer attention geometry ---
    def layer_d_head(self, layer: int) -> int:
        return self.d_head if self.d_head_per_layer is None else self.d_head_per_layer[layer]

    def layer_n_key_value_heads(self, layer: int) -> int:
        if self.n_key_value_heads_per_layer is None:
            return self.n_key_value_heads
        return self.n_key_value_heads_per_layer[layer]

    def layer_n_rep(self, layer: int) -> int:
        """Query heads per key/value head on `layer`."""
        return self.n_heads // self.layer_n_key_value_heads(layer)

    def layer_k_eq_v(self, layer: int) -> bool:
        return bool(self.k_eq_v and self.k_eq_v[layer])

    def layer_kv_source(self, layer: int) -> int | None:
        """The layer whose keys/values `layer` attends to (None: its own)."""
        return None if self.kv_source_layer is None else self.kv_source_layer[layer]

    def layer_d_mlp(self, layer: int) -> int:
        return self.d_mlp if self.d_mlp_per_layer is None else self.d_mlp_per_layer[layer]

    @property
    def uniform_mlp_width(self) -> bool:
        return all(self.layer_d_mlp(i) == self.d_mlp for i in range(self.n_layers))

    def layer_rope_rotary_fraction(self, layer: int) -> float:
        return 1.0 if self.rope_rotary_fraction is None else self.rope_rotary_fraction[layer]

    @property
    def uniform_attention_geometry(self) -> bool:
        """Whether every layer has d_head and n_key_value_heads (so TransformerLens's [layer, head, ...] stacks of
        attention weights exist)."""
        return all(self.layer_d_head(i) == self.d_head and self.layer_n_key_value_heads(i) == self.n_key_value_heads
                   for i in range(self.n_layers))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- construction from HF (lens_det.hf does it; these methods import it when called, since lens_det.hf imports
    # this module) ---
    @classmethod
    def from_hf_config(cls, hf_config: Any) -> LensConfig:
        """Build from a `transformers` config object (BloomConfig, GemmaConfig, Gemma2Config, Gemma3TextConfig,
        VaultGemmaConfig, Gemma4TextConfig, or a Gemma3Config / Gemma4Config whose text part is used):
        `lens_det.hf.config_from_hf`."""
        from lens_det.hf import config_from_hf

        return config_from_hf(hf_config)

    @classmethod
    def from_name(cls, name: str) -> LensConfig:
        """Build from a named file in `model_configs/` (e.g. "bloom-560m", "gemma-2-2b", "tiny-bloom"):
        `lens_det.hf.config_from_name`."""
        from lens_det.hf import config_from_name

        return config_from_name(name)
