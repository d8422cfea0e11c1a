"""README.md runs as written, offline: its Python blocks in order in one namespace, and its `lens-det` command
lines (slow: they are whole CLI runs). The set-up and test commands are what .ci/run itself executes."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write report files
    blocks = _blocks("python")
    assert len(blocks) >= 4
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert (tmp_path / "parity.png").exists() and (tmp_path / "patching.png").exists()


def _commands() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        block = block.replace("\\\n", " ")
        lines += [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("lens-det ")]
    return lines


def test_readme_names_its_commands():
    assert "lens-det parity" in _commands() and any(c.startswith("lens-det determinism") for c in _commands())


@pytest.mark.slow
@pytest.mark.parametrize("command", _commands())
def test_readme_commands_run(command, tmp_path):
    argv = [sys.executable, "-m", "lens_det.cli", *shlex.split(command)[1:]]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
