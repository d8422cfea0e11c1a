"""SAEs and transcoders on lens_det's hook points (Gemma Scope 1 and 2, SAELens' format), without sae_lens.

- `sae`: `SAEConfig`, `SAE` (encoder, decoder, hook points, the error-term splice);
- `formats`: `load_sae` (local directory or hub repo, any of the three formats), `save_sae`;
- `sites`: HF module paths -> lens_det hooks, hook widths;
- `splice`: `SAEMixin`, HookedDecoder's add_sae / saes() / run_with_saes / run_with_cache_with_saes;
- `features`: feature workflows (top-activating positions, attribution).
"""

from lens_det.sae.formats import load_sae, save_sae
from lens_det.sae.sae import SAE, SAEConfig
from lens_det.sae.sites import hook_for_hf_path, hook_width

__all__ = ["SAE", "SAEConfig", "hook_for_hf_path", "hook_width", "load_sae", "save_sae"]
