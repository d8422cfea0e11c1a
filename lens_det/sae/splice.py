"""Splicing SAEs into a HookedDecoder, with SAELens' HookedSAETransformer names.

    model.add_sae(sae, use_error_term=None)     attach (replacing an SAE at the same hook)
    model.remove_sae(sae_or_hook_name)  /  model.reset_saes()
    with model.saes(saes=[sae, ...]): ...        attached for the block, detached after
    model.run_with_saes(tokens, saes=[...])      / model.run_with_cache_with_saes(tokens, saes=[...])
    model.acts_to_saes                           {hook name: SAE}

An SAE at hook H reads H's activation after H's own hooks ran (a hook on H sees the model's activation, before the
SAE), and what flows on from H is the SAE's output. Its hook points are children of H: `H.hook_sae_input`,
`.hook_sae_acts_pre`, `.hook_sae_acts_post`, `.hook_sae_recons`, `.hook_sae_error`, `.hook_sae_output`, so
run_with_cache, run_with_hooks, patching, step hooks and the backward hooks see them like any hook point. A
transcoder (cfg.hook_name_out set) records its input at cfg.hook_name and replaces the activation of its output hook;
its hook points sit under its input hook. At attn.hook_z the heads are concatenated for the SAE ([b, p, h * d]) and
split back after. The SAE's weights are not the model's parameters (they keep their dtype through model.to and are
not in model.state_dict()); activations are cast to the SAE's dtype and device and back.

add_sae checks before changing anything: the hooks exist and fire, the widths match (d_in against the input hook's,
d_out against the output hook's), the SAE was trained on this model (cfg.model_name against model.name, when both
are known; check_model=False to splice it anyway).
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterable

import torch

from lens_det.sae.sae import SAE, SAE_HOOKS
from lens_det.sae.sites import hook_width


def _model_key(name: str | None) -> str | None:
    """ "google/gemma-2-2b" and "gemma-2-2b" name the same model; case and the org prefix are ignored."""
    return None if not name else name.rsplit("/", 1)[-1].lower()


class _Reader:
    """At a transcoder's input hook: keeps the activation for its output hook."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        self.value = act
        return act


class _Splice:
    """At an SAE's output hook: the SAE's output in place of the activation."""

    def __init__(self, sae: SAE, reader: _Reader | None):
        self.sae, self.reader = sae, reader
        self.heads_in, self.heads_out = (n.endswith("attn.hook_z") for n in (sae.cfg.hook_name, sae.cfg.out_hook))

    def __call__(self, act: torch.Tensor) -> torch.Tensor:
        if self.reader is None:
            x = act
        else:
            x, self.reader.value = self.reader.value, None
            if x is None:
                raise RuntimeError(f"the transcoder at {self.sae.cfg.out_hook} found no input from "
                                   f"{self.sae.cfg.hook_name} in this forward")
        x = x.flatten(-2) if self.heads_in else x
        target = act.flatten(-2) if self.heads_out else act
        return self.sae.splice(x, target).reshape(act.shape)


class SAEMixin:
    """model.add_sae & co (module docstring); mixed into HookedDecoder."""

    @property
    def _sae_splices(self) -> dict[str, _Splice]:
        """{output hook: the splice there}; each splice holds its SAE and, for a transcoder, its input reader."""
        return self.__dict__.setdefault("_sae_splices", {})

    @property
    def acts_to_saes(self) -> dict[str, SAE]:
        return {hook: splice.sae for hook, splice in self._sae_splices.items()}

    def _check_site(self, name: str, width: int, what: str) -> None:
        if name not in self.hook_dict or ".hook_sae_" in name:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=3)
            raise ValueError(f"the SAE's {what} hook {name!r} is no hook point of this model"
                             f"{' (did you mean ' + ', '.join(close) + '?)' if close else ''}")
        switch = self.disabled_hook_points().get(name)
        if switch is not None:
            raise ValueError(f"the SAE's {what} hook {name} does not fire with the current settings; call {switch}")
        have = hook_width(self.config, name)
        if have != width:
            raise ValueError(f"the SAE's {what} width is {width}, but {name} is {have} wide on this model "
                             f"({'d_in' if what == 'input' else 'd_out'} must match; wrong layer, site or model?)")

    def add_sae(self, sae: SAE, use_error_term: bool | None = None, check_model: bool = True) -> SAE:
        """Splice `sae` in at its hook (module docstring). `use_error_term` (None: keep sae.use_error_term) sets
        whether the model's activation flows on unchanged by the reconstruction error (SAE.splice)."""
        if not isinstance(sae, SAE):
            raise TypeError(f"add_sae takes a lens_det.sae.SAE (load_sae loads one), got {type(sae).__name__}")
        cfg = sae.cfg
        self._check_site(cfg.hook_name, cfg.d_in, "input")
        if cfg.is_transcoder:
            self._check_site(cfg.out_hook, cfg.out_width, "output")
            if _layer(cfg.out_hook) < _layer(cfg.hook_name):
                raise ValueError(f"a transcoder writes after it reads: {cfg.out_hook} runs before {cfg.hook_name}")
        elif cfg.out_width != cfg.d_in:
            raise ValueError(f"an SAE reconstructs its input: d_out={cfg.out_width} must equal d_in={cfg.d_in}")
        ours, theirs = _model_key(getattr(self, "name", None)), _model_key(cfg.model_name)
        if check_model and ours and theirs and ours != theirs:
            raise ValueError(f"this SAE was trained on {cfg.model_name!r}, the model is {self.name!r}: splice it "
                             "into that model, or pass check_model=False to splice it anyway")
        for name, site in list(self.acts_to_saes.items()):  # one SAE per hook, as SAELens: the new one replaces
            if cfg.out_hook in (site.cfg.out_hook, site.cfg.hook_name) or cfg.hook_name == site.cfg.hook_name:
                self.remove_sae(name)
        if use_error_term is not None:
            sae.use_error_term = use_error_term
        reader = _Reader() if cfg.is_transcoder else None
        if reader is not None:
            self.hook_dict[cfg.hook_name].splices.append(reader)
        splice = _Splice(sae, reader)
        self.hook_dict[cfg.out_hook].splices.append(splice)
        home = self.hook_dict[cfg.hook_name]
        for name in SAE_HOOKS:
            home.add_module(name, getattr(sae, name))
        self._sae_splices[cfg.out_hook] = splice
        self.setup()
        return sae

    def remove_sae(self, which: SAE | str) -> None:
        """Detach one SAE (by object, or by its output hook's name)."""
        splices = self._sae_splices
        key = next((k for k, s in splices.items() if s.sae is which), None) if isinstance(which, SAE) else which
        if key not in splices:
            raise ValueError(f"no SAE is attached at {which if isinstance(which, str) else which.cfg.out_hook}; "
                             f"attached: {sorted(splices) or 'none'}")
        splice = splices.pop(key)
        sae = splice.sae
        self.hook_dict[sae.cfg.out_hook].splices.remove(splice)
        home = self.hook_dict[sae.cfg.hook_name]
        if splice.reader is not None:
            home.splices.remove(splice.reader)
        for name in SAE_HOOKS:
            getattr(home, name).remove_hooks("both", including_permanent=True)
            delattr(home, name)
        self.setup()

    def reset_saes(self) -> None:
        """Detach every SAE."""
        for key in list(self._sae_splices):
            self.remove_sae(key)

    @contextlib.contextmanager
    def saes(self, saes: SAE | Iterable[SAE] = (), reset_saes_end: bool = True, use_error_term: bool | None = None):
        """Attach `saes` for the block; with reset_saes_end (default) they are detached after, and the SAEs they
        replaced come back."""
        saes = [saes] if isinstance(saes, SAE) else list(saes)
        before = self.acts_to_saes
        errors = {id(s): s.use_error_term for s in saes}
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
        finally:
            if reset_saes_end:
                for sae in saes:
                    if any(s is sae for s in self.acts_to_saes.values()):
                        self.remove_sae(sae)
                    sae.use_error_term = errors[id(sae)]
                for sae in before.values():
                    if not any(s is sae for s in self.acts_to_saes.values()):
                        self.add_sae(sae, check_model=False)

    def run_with_saes(self, *model_args, saes: SAE | Iterable[SAE] = (), use_error_term: bool | None = None,
                      **model_kwargs):
        """The forward with `saes` attached for the call."""
        with self.saes(saes, use_error_term=use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes: SAE | Iterable[SAE] = (),
                                 use_error_term: bool | None = None, **kwargs):
        """run_with_cache with `saes` attached for the call (the cache holds their hook points too)."""
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(self, *model_args, saes: SAE | Iterable[SAE] = (),
                                 use_error_term: bool | None = None, **kwargs):
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_hooks(*model_args, **kwargs)


def _layer(name: str) -> int:
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else -1
