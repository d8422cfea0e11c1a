"""`lens-det parity` runs cached steps that read the KV cache, or says that it did not; reports and heatmaps name
the schedule and the input they ran on."""

import json

import pytest

from lens_det.cli import main


def _run(tmp_path, *args):
    """`lens-det parity` on tiny-gemma (float32) with `args`; (exit status, the JSON report)."""
    path = tmp_path / "r.json"
    status = main(["parity", "--model", "tiny-gemma", "--dtype", "float32", "--json", str(path), *args])
    return status, json.loads(path.read_text())


# The offline character tokenizer gives BOS + one token per character: "Hell" is 5 tokens, the default --prefill.
@pytest.mark.parametrize("prompt, n_tokens", [("Hell", 5), ("Hi", 3)])
def test_cli_prompt_without_room_for_a_decode_step_is_continued(tmp_path, capsys, prompt, n_tokens):
    """A prompt of at most --prefill tokens, no --decode-steps: the prompt is continued greedily so that one
    cached step runs on the KV cache (it used to run the prefill alone, 5+0x1, or stop with a ValueError)."""
    status, data = _run(tmp_path, "--prompt", prompt)
    out = capsys.readouterr().out
    assert status == 0
    assert data["schedule"] == {"prefill": 5, "decode_steps": 1, "chunk": 1} and data["decode_steps_compared"] == 1
    decode = [r for r in data["rows"] if r["step"] == "cached:1"]
    assert len(decode) == len([r for r in data["rows"] if r["step"] == "uncached"])  # every hook, on the step
    assert all(r["bitwise"] for r in decode)  # tolerance 0: lens_det's contract, cached included
    assert f"continued greedily by {6 - n_tokens} token" in out and "5+1x1" in out
    assert f"prompt {prompt!r}" in data["inputs"]
    assert "cache off and on" in out


def test_cli_with_no_decode_step_says_the_cache_was_never_read(tmp_path, capsys):
    """--decode-steps 0 asks for the prefill alone: no step reads the KV cache, and the output says so instead of
    claiming a check with the cache on."""
    status, data = _run(tmp_path, "--prompt", "Hell", "--decode-steps", "0", "--verbose")
    out = capsys.readouterr().out
    assert status == 0 and data["passed"]
    assert data["schedule"]["decode_steps"] == 0 and data["decode_steps_compared"] == 0
    assert "cache off and on" not in out
    assert "no step read the KV cache" in out  # the table's verdict and the final line
    assert "no cached decode step" in out  # the report text (--verbose)
