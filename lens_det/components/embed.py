"""Token embedding (with Bloom's embedding LayerNorm or Gemma's sqrt(d_model) scale) and the unembedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lens_det import ops
from lens_det.components.norms import make_optional_norm
from lens_det.components.scales import EmbedScale, SoftCap  # EmbedScale moved to scales.py; re-exported here
from lens_det.config import LensConfig


class Embed(nn.Module):
    """W_E[tokens], then Bloom's LayerNorm (`embed.ln`) or Gemma's scale: what enters the residual stream
    (the model's hook_embed, as in TransformerLens)."""

    def __init__(self, cfg: LensConfig):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))  # [d_vocab, d_model]
        self.ln = make_optional_norm(cfg, cfg.embed_norm)
        self.scale = EmbedScale(cfg.d_model) if cfg.embed_scale else nn.Identity()
        self.padding_idx = cfg.embed_padding_idx  # no gradient for that row (HF's nn.Embedding padding_idx)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.scale(self.ln(F.embedding(tokens, self.W_E, padding_idx=self.padding_idx)))


class Unembed(nn.Module):
    def __init__(self, cfg: LensConfig, embed: Embed):
        super().__init__()
        # Tied models read the embedding matrix (the unscaled one, docs/numerics.md §3.7) through `embed`.
        self._embed = [embed] if cfg.tie_word_embeddings else None  # a list keeps it out of the module tree
        self.weight = None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.bias = None  # [d_vocab]: none of these families has one; weight processing (fold_ln) may add it
        self.final_cap = SoftCap(cfg.final_softcap) if cfg.final_softcap else nn.Identity()

    @property
    def w(self) -> torch.Tensor:  # [d_vocab, d_model]
        return self._embed[0].W_E if self.weight is None else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        return self.final_cap(ops.linear(x.to(w.device), w, self.bias))
