"""Regenerate model_configs/*.json for real checkpoints (run once by hand; the JSON files are the committed source
of truth): Bloom and Gemma 1-3 from a file of collected config.json copies (argv[1]), Gemma 4 and VaultGemma from
the variant tables below, copied from HF's weight-conversion scripts (only the fields they set; AutoConfig fills in
the rest from the transformers 5.23 config class defaults)."""

import json
import sys
from pathlib import Path

NAMES = {
    "bigscience/bloom-560m": "bloom-560m", "bigscience/bloom-1b1": "bloom-1b1", "bigscience/bloom-1b7": "bloom-1b7",
    "bigscience/bloom-3b": "bloom-3b", "bigscience/bloom-7b1": "bloom-7b1", "bigscience/bloom": "bloom",
    "bigscience/bloomz-560m": "bloomz-560m", "google/gemma-2b": "gemma-2b", "google/gemma-7b": "gemma-7b",
    "google/gemma-2-2b": "gemma-2-2b", "google/gemma-2-9b": "gemma-2-9b", "google/gemma-2-27b": "gemma-2-27b",
    "google/gemma-3-270m": "gemma-3-270m", "google/gemma-3-1b-pt": "gemma-3-1b", "google/gemma-3-4b-pt": "gemma-3-4b",
    "google/gemma-3-12b-pt": "gemma-3-12b", "google/gemma-3-27b-pt": "gemma-3-27b",
}

GEMMA4_ROPE = {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
SLIDING_5_1 = ["sliding_attention"] * 5 + ["full_attention"]
GEMMA4_SOURCE = ("github:huggingface/transformers src/transformers/models/gemma4/convert_gemma4_weights.py "
                 "(_VARIANTS: the text_config of each variant)")
UNIFIED_SOURCE = ("github:huggingface/transformers src/transformers/models/gemma4_unified/"
                  "convert_gemma4_unified_weights.py (_VARIANTS gemma-4-12b)")
CONVERTER_VARIANTS = {  # name: (hf_name, architecture, hf_config fields, sources, notes)
    "gemma-4-e2b": ("google/gemma-4-E2B", "Gemma4ForConditionalGeneration", dict(
        model_type="gemma4_text", hidden_size=1536, hidden_size_per_layer_input=256, intermediate_size=4 * 1536,
        num_hidden_layers=35, layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7,
        num_attention_heads=8, num_key_value_heads=1, num_global_key_value_heads=None, attention_k_eq_v=False,
        num_kv_shared_layers=20, use_double_wide_mlp=True, final_logit_softcapping=30.0,
        rope_parameters=GEMMA4_ROPE), [GEMMA4_SOURCE], "per-layer embeddings, 20 KV-shared layers, double-wide MLP"),
    "gemma-4-e4b": ("google/gemma-4-E4B", "Gemma4ForConditionalGeneration", dict(
        model_type="gemma4_text", hidden_size=2560, hidden_size_per_layer_input=256, intermediate_size=4 * 2560,
        num_hidden_layers=42, layer_types=SLIDING_5_1 * 7, num_attention_heads=8, num_key_value_heads=2,
        num_global_key_value_heads=None, global_head_dim=512, attention_k_eq_v=False, num_kv_shared_layers=18,
        final_logit_softcapping=30.0, rope_parameters=GEMMA4_ROPE), [GEMMA4_SOURCE],
        "per-layer embeddings, 18 KV-shared layers"),
    "gemma-4-31b": ("google/gemma-4-31B", "Gemma4ForConditionalGeneration", dict(
        model_type="gemma4_text", hidden_size=5376, hidden_size_per_layer_input=0, intermediate_size=4 * 5376,
        num_hidden_layers=60, layer_types=SLIDING_5_1 * 10, num_attention_heads=32, num_key_value_heads=16,
        num_global_key_value_heads=4, attention_k_eq_v=True, use_bidirectional_attention="vision",
        num_kv_shared_layers=0, sliding_window=1024, final_logit_softcapping=30.0, rope_parameters=GEMMA4_ROPE,
        max_position_embeddings=262_144), [GEMMA4_SOURCE], "dense, K = V on full layers"),
    "gemma-4-26b-a4b": ("google/gemma-4-26B-A4B", "Gemma4ForConditionalGeneration", dict(
        model_type="gemma4_text", hidden_size=2816, hidden_size_per_layer_input=0, intermediate_size=2112,
        num_hidden_layers=30, layer_types=SLIDING_5_1 * 5, num_attention_heads=16, num_key_value_heads=8,
        num_global_key_value_heads=2, attention_k_eq_v=True, use_bidirectional_attention="vision",
        num_kv_shared_layers=0, enable_moe_block=True, num_experts=128, moe_intermediate_size=704, top_k_experts=8,
        sliding_window=1024, final_logit_softcapping=30.0, rope_parameters=GEMMA4_ROPE,
        max_position_embeddings=262_144), [GEMMA4_SOURCE], "mixture of experts (128, top-8) beside a dense MLP"),
    "gemma-4-12b": ("google/gemma-4-12B", "Gemma4UnifiedForConditionalGeneration", dict(
        model_type="gemma4_unified_text", hidden_size=3840, intermediate_size=4 * 3840, num_hidden_layers=48,
        layer_types=SLIDING_5_1 * 8, num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=1,
        attention_k_eq_v=True, use_bidirectional_attention="vision", num_kv_shared_layers=0,
        use_double_wide_mlp=False, final_logit_softcapping=30.0, rope_parameters=GEMMA4_ROPE), [UNIFIED_SOURCE],
        "Gemma 4 unified: dense, K = V on full layers, no per-layer embeddings or MoE"),
    "vaultgemma-1b": ("google/vaultgemma-1b", "VaultGemmaForCausalLM", dict(
        model_type="vaultgemma", vocab_size=256000, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=4, hidden_size=1152, intermediate_size=6912, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, layer_types=["full_attention"] * 26, max_position_embeddings=1024),
        ["github:keras-team/keras-hub keras_hub/src/utils/transformers/convert_gemma_test.py "
         "(test_convert_vaultgemma_backbone_config: the vaultgemma-1b shapes)",
         "transformers docs model_doc/vaultgemma (1B, full attention on every layer, 1024-token sequences)"],
        "Gemma 2 without the post-norms. The soft-caps (attention 50, final 30) are VaultGemmaConfig's defaults, "
        "not confirmed against the hub config.json"),
}


def write(out_dir: Path, record: dict) -> None:
    (out_dir / f"{record['name']}.json").write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", record["name"])


out_dir = Path(__file__).resolve().parent.parent / "model_configs"
for name, (hf_name, architecture, fields, sources, notes) in CONVERTER_VARIANTS.items():
    config = {"model_type": fields["model_type"], "architectures": [architecture],
              **{k: v for k, v in fields.items() if k != "model_type"}}
    write(out_dir, {"name": name, "hf_name": hf_name, "hf_config": config, "sources": sources, "notes": notes})
if len(sys.argv) < 2:
    sys.exit("pass the collected Bloom / Gemma 1-3 config file to regenerate those too")
source = json.loads(Path(sys.argv[1]).read_text())
for hf_name, name in NAMES.items():
    entry = source[hf_name]
    record = {
        "name": name,
        "hf_name": hf_name,
        "hf_config": entry["config"],
        "sources": entry["sources"],
        "notes": entry.get("notes", ""),
    }
    write(out_dir, record)
