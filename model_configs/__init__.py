"""Named model configs, one JSON file each (real checkpoints' shapes and the tiny-*/mid-* test and benchmark
configs). This folder is installed as the package data `lens_det.model_configs` (see pyproject.toml)."""
