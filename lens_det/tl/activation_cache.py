"""LensActivationCache (TransformerLens's ActivationCache, refusing decompositions that would not sum to the
residual stream), why_residual_not_additive (the predicate it asks) and unknown_hook_message (the error for a hook
name the model does not have)."""

from __future__ import annotations

from transformer_lens import ActivationCache

from lens_det.config import LensConfig


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

    def _refuse_streams(self, what: str) -> None:
        n = self.model.config.n_streams
        if n > 1:
            raise ValueError(f"{what} reads the residual stream through ln_final, but on this multi-stream (AltUp) "
                             f"model the final norm reads the mean of {n} magnitude-matched streams, not stream 0 "
                             "(hook_resid_pre / _post); read cache['streams_out.hook_mean'] or the stream stacks "
                             "(blocks.{i}.hook_streams_post) instead")

    def apply_ln_to_stack(self, *args, **kwargs):
        self._refuse_streams("apply_ln_to_stack")
        return super().apply_ln_to_stack(*args, **kwargs)

    def logit_lens(self, *args, **kwargs):
        self._refuse_streams("logit_lens")
        return super().logit_lens(*args, **kwargs)

    def accumulated_resid(self, *args, **kwargs):
        if kwargs.get("apply_ln") or (len(args) > 2 and args[2]):
            self._refuse_streams("accumulated_resid(apply_ln=True)")
        return super().accumulated_resid(*args, **kwargs)

    def decompose_resid(self, *args, **kwargs):
        if self.model.config.n_streams > 1:
            raise ValueError(f"decompose_resid would not sum to the residual stream here: "
                             f"{self.model.why_residual_not_additive()}")
        if self.model.config.layer_scalar:
            raise ValueError("decompose_resid would not sum to the residual stream here: each block multiplies the "
                             "whole residual stream by its layer_scalar (blocks.{i}.layer_scalar), so the stream is "
                             "not embed + the attn_out / mlp_out of earlier blocks. Read cache['resid_post', i] "
                             "directly, or scale each part by the product of the later blocks' layer_scalar")
        return super().decompose_resid(*args, **kwargs)


def why_residual_not_additive(config: LensConfig) -> str | None:
    """None when every head's result and every neuron's output is added to the residual stream as it is (so TL's
    per-head / per-neuron decompositions sum to it); otherwise why not."""
    c = config
    if c.n_streams > 1:
        return (f"the residual is AltUp's {c.n_streams} streams, mixed by a learned per-token router in every block "
                "(hook_resid_pre / _post are stream 0), so it is not embed + the sum of the attention and MLP outputs")
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
