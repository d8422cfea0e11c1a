"""TLWeights: HookedDecoder's weights in TransformerLens's names and shapes (W_E, W_U, the [n_layers, ...]
stacks W_Q ... b_out, OV / QK, tl_parameters), what TL tools compute from them (accumulated_bias, the residual
directions of tokens, the final norm's gain and bias logits, the logit-lens adapter, all_head_labels), and
process_weights_, TransformerLens's weight processing (lens_det.tl.weight_processing)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from jaxtyping import Float


def _or_zeros(bias, like):
    return bias if bias is not None else torch.zeros_like(like)


class TLWeights:
    """Weight views of a HookedDecoder (reads self.embed, self.blocks, self.ln_final, self.unembed, self.config)."""

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
                         refactor_factored_attn_matrices: bool = False):
        """TransformerLens's weight processing, in place, with TL's defaults and meaning; each step must be valid
        for the family (RMSNorm cannot be centred, a soft-capped unembedding cannot be centred, RoPE / GQA have no
        QK refactor) or ValueError says which to switch off. The logits (log-probs after center_unembed) stay equal
        up to float rounding; the model is then no longer HF-exact (`model.processing` lists the steps). Also
        available at load time: from_pretrained / from_hf_model / from_config(..., fold_ln=True, ...)."""
        from lens_det.tl.weight_processing import process_weights_

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
