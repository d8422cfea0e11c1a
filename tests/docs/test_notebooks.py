"""Every notebook runs headless on its tiny default model; a failing cell fails the suite; figures render."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_all_five_notebooks_exist():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("tiny", [None, "tiny-gemma4", "tiny-gemma3n"], ids=["default", "gemma4", "gemma3n"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_and_renders_figures(path, tiny, monkeypatch):
    """Each notebook on its own tiny default model, on a tiny Gemma 4 (per-layer head dims, K = V) and on a tiny
    Gemma 3n (AltUp streams: notebook 01 says why it has no logit lens)."""
    monkeypatch.delenv("LENS_DET_MODEL", raising=False)
    if tiny is None:
        monkeypatch.delenv("LENS_DET_TINY", raising=False)
    else:
        monkeypatch.setenv("LENS_DET_TINY", tiny)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures
    # the kernel runs in notebooks/: make it import this checkout's lens_det, not whichever one is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} rendered no figure"
    text = "".join(o.get("text", "") for o in outputs)
    if path.stem.startswith("02"):
        assert "cache on == cache off: True" in text and "FAIL" in text  # the injected bug is caught
        assert "with the bug injected the cached logits move by up to 0;" not in text
    if path.stem.startswith("03"):
        assert "equal to the uncached re-run: [True, True, True, True, True, True]" in text
    if path.stem.startswith("04"):
        assert "same tokens: True" in text and "same logits every step: True" in text
    if path.stem.startswith("05"):
        assert text.count("equal to the original: True") == 6 and "equal to the original: False" not in text
        assert "use_error_term=True, all three spliced: logits bit-identical: True" in text
        assert text.count("logits equal: False") == 3  # without the error term each SAE changes the logits
        assert "steered tokens, cache on == cache off: True" in text and "steering changed the text: True" in text
        assert "steered logits, cache on == cache off: True" in text
        assert "same tokens: True ; same feature activations every step: True" in text
