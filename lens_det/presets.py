"""The named configs: model_configs/*.json, each an HF config written in HF's own vocabulary (so a named config
goes through the same converter, lens_det.hf, as a real checkpoint), plus the tiny seeded ones the CLI and the tests
run by default. Imports nothing from lens_det (it is data; `lens_det.hf.config_from_name` turns a name into a
LensConfig).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

# The tiny random-weight configs (model_configs/tiny-*.json), Bloom first, then Gemma by generation: what
# `lens-det parity` / `lens-det determinism` run without --model, and what the test suite parametrises over.
_TINY = ("tiny-bloom", "tiny-bloom-resid", "tiny-gemma", "tiny-gemma2", "tiny-vaultgemma", "tiny-gemma3",
         "tiny-gemma4", "tiny-gemma4-ple", "tiny-gemma4-moe", "tiny-gemma3n")


def tiny_configs(family: Literal["bloom", "gemma"] | None = None) -> list[str]:
    """The tiny configs' names, in the order above; `family` keeps Bloom's ("bloom") or the Gemma family's
    ("gemma": Gemma 1-4 and VaultGemma)."""
    if family not in (None, "bloom", "gemma"):
        raise ValueError(f"family must be 'bloom', 'gemma' or None, got {family!r}")
    records = named_configs()
    return [name for name in _TINY
            if family is None or (records[name]["hf_config"]["model_type"] == "bloom") == (family == "bloom")]


def _configs_dir():
    """The model_configs/ folder of the source checkout lens_det is imported from, or else the installed
    `lens_det.model_configs` (the build maps model_configs/ there). The checkout comes first: an editable install
    of another checkout (or a git worktree) would otherwise serve that checkout's files."""
    checkout = Path(__file__).resolve().parent.parent / "model_configs"
    if (checkout / "__init__.py").is_file():
        return checkout
    return resources.files("lens_det.model_configs")


def named_configs() -> dict[str, dict[str, Any]]:
    """All named configs: {name: the JSON record (hf_name, hf_config, sources, notes)}."""
    records: dict[str, dict[str, Any]] = {}
    for entry in sorted(_configs_dir().iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        record = json.loads(entry.read_text())
        name = record["name"]
        if name in records:
            raise ValueError(f"two files in model_configs declare the name {name!r}")
        if entry.name != f"{name}.json":
            raise ValueError(f"model_configs/{entry.name} declares name {name!r}; rename one of them")
        records[name] = record
    return records


def resolve_name(name: str) -> dict[str, Any]:
    """The named-config record for `name` (short name like "bloom-560m" or the HF id "bigscience/bloom-560m")."""
    records = named_configs()
    if name in records:
        return records[name]
    for record in records.values():
        if record.get("hf_name") == name:
            return record
    raise ValueError(
        f"unknown model config {name!r}; known names: {', '.join(sorted(records))} "
        "(or pass a local directory / an HF model object to from_pretrained)"
    )


def hf_config_from_name(name: str) -> Any:
    """The `transformers` config object described by the named config."""
    from transformers import AutoConfig

    fields = dict(resolve_name(name)["hf_config"])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
