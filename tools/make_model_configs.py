"""Regenerate model_configs/*.json for real checkpoints from ../shared/checkpoints.json (run once by hand;
the JSON files are the committed source of truth)."""

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

source = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/checkpoints.json").read_text())
out_dir = Path(__file__).resolve().parent.parent / "model_configs"
for hf_name, name in NAMES.items():
    entry = source[hf_name]
    record = {
        "name": name,
        "hf_name": hf_name,
        "hf_config": entry["config"],
        "sources": entry["sources"],
        "notes": entry.get("notes", ""),
        "copied_from": "shared/checkpoints.json",
    }
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", name)
