"""lens_det: hooked Bloom and Gemma models that match Hugging Face bit for bit, with and without a KV cache."""

from lens_det.blas import blas_mode, use_reproducible_blas

use_reproducible_blas()  # MKL's strict reproducibility mode: only possible before the process's first GEMM

from lens_det.components.positions import positions_from_mask
from lens_det.config import LensConfig, named_configs
from lens_det.kv_cache import KVCache
from lens_det.loading import from_config, from_hf_model, from_pretrained
from lens_det.memory import keep_freed_memory
from lens_det.model import HookedDecoder
from lens_det.ops import deterministic
from lens_det.sae import SAE, SAEConfig, load_sae, save_sae

__all__ = [
    "HookedDecoder",
    "KVCache",
    "LensConfig",
    "blas_mode",
    "deterministic",
    "from_config",
    "from_hf_model",
    "from_pretrained",
    "keep_freed_memory",
    "named_configs",
    "positions_from_mask",
    "SAE",
    "SAEConfig",
    "load_sae",
    "save_sae",
]
