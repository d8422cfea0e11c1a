"""TLConfigView, `model.cfg`: the LensConfig seen through TransformerLens's field names and conventions."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lens_det.model import HookedDecoder


class TLConfigView:
    """`model.cfg`: the architecture config plus the runtime fields TransformerLens reads (device, dtype).

    Every LensConfig field reads through unchanged (`model.cfg.n_layers` is `model.config.n_layers`), except the
    names TransformerLens gives another meaning, which answer in TransformerLens's terms:
    - `act_fn`: TransformerLens's name of the activation ("gelu_fast", "gelu_pytorch_tanh", "gelu"), which TL tools
      dispatch on; lens_det's own name ("bloom_gelu", "gelu_tanh", "gelu_erf") is `model.config.act_fn`. The two
      cannot agree: TL has no name "bloom_gelu", and its "gelu" means the erf form.
    - `normalization_type`: "LNPre" / "RMSPre" once fold_ln left the norms weightless (model.processing).
    The other TransformerLens names (positional_embedding_type, eps, attn_types, the soft-caps as -1.0 for "none",
    rotary_base, ...) are properties below."""

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
        return f"{type(self).__name__}({self._model.config}, device={self.device}, dtype={self.dtype})"

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


RuntimeConfig = TLConfigView  # the name before the move to lens_det.tl (lens_det.model re-exports it)
