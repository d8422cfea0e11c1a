"""Multi-stream residuals (AltUp, Gemma 3n) and LAuReL, with HF's op order and dtypes (Gemma3nTextAltUp,
Gemma3nTextLaurelBlock and the stream expansion / collapse of Gemma3nTextModel.forward).

The residual is one [n_streams, batch, pos, d_model] tensor. Stream 0 is the one the block computes on.

- `StreamsIn`: streams 1.. are projections of the embedding, each rescaled to stream 0's root-mean-square;
- `AltUp.predict`: a router (RMSNorm, times 1/d, a linear layer, tanh in fp32) gives each token an S x S mix, and
  prediction_i = sum_j C[i, j] stream_j + stream_i (one matmul, then the add);
- `AltUp.correct`: corrected_i = (output - prediction_0) * (c_i + 1) + prediction_i, the router run again on the
  block's output;
- `StreamsOut`: streams 1.. through their own projections, rescaled to stream 0's RMS, and all averaged;
- `Laurel`: x + ln(w_right @ (w_left @ x)), the block adding it beside the attention output.

Everything runs in the model dtype (the magnitude match too); only the router's tanh and RMSNorm go through fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from lens_det import ops
from lens_det.components.norms import make_norm
from lens_det.config import LensConfig
from lens_det.hooks import HookPoint

MAGNITUDE_FLOOR = 1e-5  # HF clamps the mean square at this (not rms_norm_eps) before the square root


def rms(x: torch.Tensor) -> torch.Tensor:
    """HF's target magnitude: mean(x ** 2) ** 0.5 over the last axis, in x's dtype, no eps."""
    return torch.mean(x**2, dim=-1, keepdim=True) ** 0.5


def match_magnitude(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(x * target) / sqrt(clamp(mean(x ** 2), 1e-5)), left to right as HF."""
    norm = torch.sqrt(torch.mean(x**2, dim=-1, keepdim=True).clamp(min=MAGNITUDE_FLOOR))
    return (x * target) / norm


def _stream_projections(cfg: LensConfig) -> nn.ParameterList:
    """One [d_model, d_model] projection per stream 1.. (HF's altup_projections / altup_unembed_projections)."""
    return nn.ParameterList(nn.Parameter(torch.empty(cfg.d_model, cfg.d_model)) for _ in range(cfg.n_streams - 1))


class StreamsIn(nn.Module):
    def __init__(self, cfg: LensConfig):
        super().__init__()
        self.w = _stream_projections(cfg)
        self.hook_streams = HookPoint()  # [stream, batch, pos, d_model]: the streams block 0 reads

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        target = rms(embedding)
        streams = [embedding] + [match_magnitude(ops.linear(embedding, w), target) for w in self.w]
        return self.hook_streams(torch.stack(streams, dim=0))


class StreamsOut(nn.Module):
    def __init__(self, cfg: LensConfig):
        super().__init__()
        self.w = _stream_projections(cfg)
        self.hook_streams = HookPoint()  # [stream, batch, pos, d_model]: stream 0 and the matched projections
        self.hook_mean = HookPoint()  # [batch, pos, d_model]: their mean, what ln_final reads

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        target = rms(streams[0])
        parts = [streams[0]] + [match_magnitude(ops.linear(streams[i + 1], w), target) for i, w in enumerate(self.w)]
        return self.hook_mean(torch.mean(self.hook_streams(torch.stack(parts)), dim=0))


class AltUp(nn.Module):
    def __init__(self, cfg: LensConfig):
        super().__init__()
        n, d = cfg.n_streams, cfg.d_model
        self.n_streams = n
        self.correct_scale = cfg.altup_correct_scale
        # the router's RMSNorm runs twice per block (predict, correct), so it has no hook points of its own: the
        # router's outputs (hook_predict_coefs, hook_correct_coefs) are the hooks
        self.w_router_norm = nn.Parameter(torch.empty(d))
        self.norm_eps, self.norm_inv_sqrt = cfg.norm_eps, cfg.rmsnorm_inv_sqrt
        self.w_router = nn.Parameter(torch.empty(n, d))
        self.w_predict = nn.Parameter(torch.empty(n * n, n))
        self.w_correct = nn.Parameter(torch.empty(n, n))
        self.correct_output_scale = nn.Parameter(torch.empty(d))
        # HF's router_input_scale: a float32 buffer tensor(1 / d), cast with the model (so rounded to its dtype)
        self.router_scale = torch.tensor(d**-1.0, dtype=torch.float32, device="cpu")
        self.hook_predict_coefs = HookPoint()  # [batch, pos, stream, stream]: C[i, j], prediction i's weight of j
        self.hook_predictions = HookPoint()  # [stream, batch, pos, d_model]
        self.hook_correct_coefs = HookPoint()  # [batch, pos, stream]: c_i + 1
        self.hook_innovation = HookPoint()  # [batch, pos, d_model]: the block's output - prediction 0
        self.hook_corrected = HookPoint()  # [stream, batch, pos, d_model]

    def forward(self, x: torch.Tensor, predictions: torch.Tensor | None = None):
        """predict(x) for the block's input streams; with `predictions`, (correct(predictions, x), what the
        per-layer gate reads) for the block's output x. One entry point, so that accelerate's offload hook on this
        module loads its weights for both steps."""
        if predictions is None:
            return self.predict(x)
        corrected = self.correct(predictions, x)
        return corrected, self.scale_for_gate(corrected[0]) if self.correct_scale else corrected[0]

    def _modalities(self, x: torch.Tensor) -> torch.Tensor:
        normed = ops.rms_norm(x, self.w_router_norm, self.norm_eps, unit_offset=False, inv_sqrt=self.norm_inv_sqrt)
        routed = ops.linear(normed * self.router_scale.to(x.device, x.dtype), self.w_router)
        return torch.tanh(routed.float()).type_as(x)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        n, (b, t) = self.n_streams, streams.shape[1:3]
        coefs = self.hook_predict_coefs(ops.linear(self._modalities(streams[0]), self.w_predict).reshape(b, t, n, n))
        predictions = torch.matmul(streams.permute(1, 2, 3, 0), coefs.permute(0, 1, 3, 2)).permute(3, 0, 1, 2)
        predictions += streams  # in place on the permuted view, as HF (its backward then runs HF's matmul layouts)
        return self.hook_predictions(predictions.contiguous())

    def correct(self, predictions: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        coefs = self.hook_correct_coefs(ops.linear(self._modalities(output), self.w_correct) + 1.0)
        innovation = self.hook_innovation(output - predictions[0]).repeat(self.n_streams, 1, 1, 1)
        corrected = torch.mul(innovation, coefs.permute(2, 0, 1).unsqueeze(-1))
        corrected += predictions  # in place, as HF
        return self.hook_corrected(corrected.contiguous())

    def scale_for_gate(self, x: torch.Tensor) -> torch.Tensor:
        """What the per-layer gate reads with altup_correct_scale: corrected stream 0 times the learned scale."""
        scale = self.correct_output_scale
        return (x.type_as(scale) * scale).type_as(x)


class Laurel(nn.Module):
    """x + ln(w_right @ (w_left @ x)) (Gemma3nTextLaurelBlock: its output includes its input)."""

    def __init__(self, cfg: LensConfig):
        super().__init__()
        self.w_left = nn.Parameter(torch.empty(cfg.laurel_rank, cfg.d_model))
        self.w_right = nn.Parameter(torch.empty(cfg.d_model, cfg.laurel_rank))
        self.ln = make_norm(cfg)
        self.hook_low = HookPoint()  # [batch, pos, laurel_rank]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ln(ops.linear(self.hook_low(ops.linear(x, self.w_left)), self.w_right))
