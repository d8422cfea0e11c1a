"""Seeded random HF reference models for the named configs (the old path lens_det.parity.models re-exports them)."""

from __future__ import annotations

import torch

from lens_det.presets import hf_config_from_name


def random_hf_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.3,
                    experts_implementation: str | None = None, attn_implementation: str = "eager"):
    """HF model of a named config, with `attn_implementation` ("eager" by default, or "sdpa"), every parameter (norm
    weights and biases too) and every persistent buffer (Gemma 4's layer_scalar) drawn from N(0, std) in float32
    with `seed`, then rounded to `dtype`.

    Built with `from_config(dtype=...)`, never `.to(dtype)`, so RoPE tables stay float32 as with
    `from_pretrained` (docs/numerics.md §3.4). Random norm weights make the (1 + w) and cast-order pitfalls visible,
    random layer scalars a missing or misplaced scalar. Non-persistent buffers (RoPE tables, the embedding scale) are
    derived from the config and left as HF computed them. `experts_implementation` (MoE models): HF's switch,
    passed to from_config ("grouped_mm", "eager"; None: HF's default, grouped_mm). The weights do not depend on
    `attn_implementation`.
    """
    return random_hf_model_from_config(hf_config_from_name(name), dtype, seed, std,
                                       experts_implementation=experts_implementation,
                                       attn_implementation=attn_implementation)


def random_hf_model_from_config(hf_config, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.3,
                                model_class=None, experts_implementation: str | None = None,
                                attn_implementation: str = "eager"):
    """`random_hf_model` for a `transformers` config object; `model_class` (e.g. Gemma4ForConditionalGeneration)
    defaults to the config's causal-LM class."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    if model_class is None:
        model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
    else:
        model = model_class._from_config(hf_config, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        persistent = model.state_dict().keys()
        for name, buffer in model.named_buffers():
            if name in persistent and buffer.is_floating_point():
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * std)
    return model.eval()
