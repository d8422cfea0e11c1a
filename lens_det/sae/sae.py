"""Sparse autoencoders and transcoders: weights, encoder, decoder and their hook points.

An `SAE` reads one activation `x` (its input hook, `cfg.hook_name`) and writes a reconstruction to its output hook
(`cfg.hook_name_out`; the same hook for an SAE, the MLP output for a transcoder):

    pre   = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc          hook_sae_acts_pre
    acts  = relu(pre)                          "relu" (SAELens "standard")
          = relu(pre) * (pre > threshold)      "jumprelu" (strictly greater: a value at the threshold is off)
          = relu of the k largest of pre, 0 elsewhere  "topk" (ties at the k-th value: the lower feature index)
                                                                                 hook_sae_acts_post
    recon = acts @ W_dec + b_dec (+ x @ W_skip, a transcoder's affine skip)      hook_sae_recons

The matmuls are lens_det.ops.linear (F.linear; batch-invariant in deterministic mode, so cached and uncached feature
activations agree bit for bit there). Shapes: W_enc [d_in, d_sae], W_dec [d_sae, d_out], W_skip [d_in, d_out] (Gemma
Scope 2's orientation; SAELens stores its transpose and the loader transposes it). An SAE keeps its own dtype: the
activation is cast to it on the way in and the reconstruction back to the model's dtype on the way out
(lens_det.sae.splice). An embedding SAE of Gemma Scope 1 reads hook_embed divided by `input_scale` (sqrt(d_model):
lens_det's reading is that it was trained on the unscaled table rows; README's Known limits) and writes its
reconstruction multiplied by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lens_det import ops
from lens_det.hooks import HookPoint, is_hooked

ARCHITECTURES = ("relu", "jumprelu", "topk")
SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
             "hook_sae_output")


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    hook_name: str  # the lens_det hook it reads ("blocks.3.hook_resid_post", "blocks.3.ln2.hook_normalized")
    architecture: str = "jumprelu"  # one of ARCHITECTURES
    hook_name_out: str | None = None  # the hook it writes (None: hook_name; a transcoder: the MLP output)
    d_out: int | None = None  # None: d_in
    k: int | None = None  # topk's k
    apply_b_dec_to_input: bool = False
    skip: bool = False  # a transcoder's affine skip connection (W_skip)
    input_scale: float | None = None  # Gemma Scope 1's embedding SAE: reads hook / scale, writes recon * scale
    model_name: str | None = None  # the model it was trained on, as its file names it (checked by add_sae)
    source: str = ""  # where it was loaded from (format and path), for messages
    metadata: dict = field(default_factory=dict)  # the rest of its config file, as read

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"SAE architecture {self.architecture!r} is not implemented (implemented: "
                             f"{', '.join(ARCHITECTURES)}; SAELens' 'standard' is 'relu')")
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= self.d_sae):
            raise ValueError(f"a topk SAE needs an integer k in [1, d_sae={self.d_sae}], got k={self.k!r}")
        if min(self.d_in, self.d_sae, self.d_out or 1) <= 0:
            raise ValueError(f"SAE widths must be positive: d_in={self.d_in}, d_sae={self.d_sae}, d_out={self.d_out}")

    @property
    def out_width(self) -> int:
        return self.d_out or self.d_in

    @property
    def out_hook(self) -> str:
        return self.hook_name_out or self.hook_name

    @property
    def is_transcoder(self) -> bool:
        return self.out_hook != self.hook_name


class SAE(nn.Module):
    """A sparse autoencoder or transcoder (module docstring). `sae(x)` is its reconstruction of x; spliced into a
    model (model.add_sae) it runs through `splice`, with `use_error_term` as SAELens means it."""

    def __init__(self, cfg: SAEConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.cfg = cfg
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.out_width, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.out_width, **kw))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.out_width, **kw))
        if cfg.apply_b_dec_to_input and cfg.out_width != cfg.d_in:
            raise ValueError("apply_b_dec_to_input needs d_out == d_in (b_dec is subtracted from the input)")
        for name in SAE_HOOKS:
            setattr(self, name, HookPoint())
        self.use_error_term = False
        self.requires_grad_(False)  # inference weights; gradients flow to the activations through them

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def hook_points(self) -> dict[str, HookPoint]:
        return {name: getattr(self, name) for name in SAE_HOOKS}

    def is_hooked(self) -> bool:
        """Whether any hook reads or edits the features (then `splice` computes the clean reconstruction apart)."""
        return any(is_hooked(getattr(self, name)) for name in SAE_HOOKS[:4])

    # --- the computation, on tensors in the SAE's dtype and device ---
    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return ops.linear(x, self.W_enc.T, self.b_enc)

    def _activation(self, pre: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        order = torch.sort(pre, dim=-1, descending=True, stable=True).indices[..., : self.cfg.k]  # ties: lower index
        return torch.zeros_like(pre).scatter(-1, order, torch.relu(pre.gather(-1, order)))

    def _decode(self, acts: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        recon = ops.linear(acts, self.W_dec.T, self.b_dec)
        if self.cfg.skip:
            if x is None:
                raise ValueError("a transcoder with an affine skip connection decodes from its input too: "
                                 "call decode(acts, x)")
            recon = recon + ops.linear(x, self.W_skip.T)
        return recon

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"this SAE reads width d_in={self.cfg.d_in}, got a tensor of shape {tuple(x.shape)} "
                             f"({self.cfg.source or 'SAE'})")
        return x.to(device=self.device, dtype=self.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations of x (any leading axes), in the SAE's dtype, through its hook points."""
        x = self.hook_sae_input(self._cast(x))
        pre = self.hook_sae_acts_pre(self._pre(x))
        return self.hook_sae_acts_post(self._activation(pre))

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction from feature activations (and, with an affine skip, the input x)."""
        return self.hook_sae_recons(self._decode(acts, None if x is None else self._cast(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._cast(x)
        return self.decode(self.encode(x), x if self.cfg.skip else None)

    def splice(self, x: torch.Tensor, target: torch.Tensor, use_error_term: bool | None = None) -> torch.Tensor:
        """What flows on at the output hook: the reconstruction of `target` (the output hook's activation; for an
        SAE, x itself) from input `x`, both in the model's dtype and flattened to [..., width], or with
        `use_error_term`

            target + (recon - clean recon)

        where the clean reconstruction is recon itself unless a hook read or edited the features (then it is
        recomputed without hooks or gradient). Unedited, that is `target + 0.0`: bit for bit the model's activation
        (a -0.0 entry becomes +0.0), with the gradient of SAELens' `recon + error` (1 to both the activation and
        the reconstruction). hook_sae_error sees `target - clean recon`; an edit of it (returned or in place)
        makes the output `recon + edited error`. Without the error term the output is recon. hook_sae_input,
        _acts_pre, _acts_post and _recons are in the SAE's dtype; hook_sae_error and _output in the model's."""
        use_error_term = self.use_error_term if use_error_term is None else use_error_term
        scale = self.cfg.input_scale
        xs = self._cast(x)
        if scale is not None:
            xs = xs / scale
        hooked = use_error_term and self.is_hooked()
        recon = self.decode(self.encode(xs), xs if self.cfg.skip else None)
        recon = self._back(recon, target)
        if not use_error_term:
            return self.hook_sae_output(recon)
        if hooked:
            with torch.no_grad():
                clean = self._back(self._decode(self._activation(self._pre(xs.detach())), xs.detach()), target)
        else:
            clean = recon.detach()
        error = target - clean
        version = error._version
        edited = self.hook_sae_error(error)
        untouched = edited is error and error._version == version
        out = target + (recon - clean) if untouched else recon + edited
        return self.hook_sae_output(out)

    def _back(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A reconstruction in the SAE's dtype -> the output hook's scale, dtype and device."""
        if self.cfg.input_scale is not None:
            recon = recon * self.cfg.input_scale
        return recon.to(device=target.device, dtype=target.dtype)
