"""TLInterface: HookedDecoder's TransformerLens interface besides weights and tokens: the opt-in hook points
(set_use_*, disabled_hook_points), TransformerLens's hook plumbing under one rule (check_hooks_to_add, add_hook,
the hooks() / run_with_hooks enablers, get_caching_hooks with a position slice, run_with_cache returning a
LensActivationCache), input_to_embed, and `generate` with TransformerLens's argument spellings mapped onto
lens_det.generation.generate."""

from __future__ import annotations

from lens_det.components.hooks import position_dim
from lens_det.inputs import check_tokens, coerce_text
from lens_det.tl.activation_cache import LensActivationCache, unknown_hook_message, why_residual_not_additive


class TLInterface:
    """Mixed into HookedDecoder before transformer_lens.HookedRootModule, whose hook methods it wraps (super())."""

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
        tokens, attention_mask, text = coerce_text(self, tokens, attention_mask)
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

    def input_to_embed(self, input, attention_mask=None, past_kv_cache=None):
        """As TransformerLens 2.x: (residual stream entering block 0 [batch, pos, d_model], tokens, None (no
        shortformer positional embedding), attention_mask); hook_embed fires. Feed the residual back with
        model(residual, start_at_layer=0, attention_mask=mask) (plus input_ids=tokens on a model with per-layer
        embeddings). A string input is tokenized left-padded, and its mask returned."""
        if past_kv_cache is not None:
            raise ValueError("input_to_embed does not read a KV cache here (the embedding does not depend on it); "
                             "drop past_kv_cache and pass the cache to forward")
        tokens, attention_mask, _ = coerce_text(self, input, attention_mask)
        tokens = check_tokens(self, tokens)
        return self.hook_embed(self.embed(tokens)), tokens, None, attention_mask

    def disabled_hook_points(self) -> dict[str, str]:
        """Hook points that do not fire with the current settings, each with the call that switches it on (the
        opt-in switches of lens_det.hooks.HOOK_KINDS)."""
        from operator import attrgetter

        from lens_det.hooks import HOOK_KINDS

        opt_in = [(key.removeprefix("blocks."), kind) for key, kind in HOOK_KINDS.items() if kind.opt_in_flag]
        return {f"blocks.{i}.{name}": kind.opt_in for i, block in enumerate(self.blocks)
                for name, kind in opt_in if not attrgetter(kind.opt_in_flag)(block)}

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
        per-head / per-neuron decompositions sum to it); otherwise why not (LensActivationCache asks it)."""
        return why_residual_not_additive(self.config)
