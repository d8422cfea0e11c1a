"""The CLI on Gemma 4: `lens-det parity` with each experts implementation of the mixture of experts
(tiny-gemma4-moe), and a refused one."""

import pytest

from tests.helpers import EXPERTS_IMPLEMENTATIONS, MOE

NAME = MOE
IMPLEMENTATIONS = EXPERTS_IMPLEMENTATIONS


def test_cli_parity_with_each_experts_implementation(tmp_path, capsys):
    from lens_det.cli import main

    for implementation in IMPLEMENTATIONS:
        out = tmp_path / f"{implementation}.json"
        assert main(["parity", "--model", NAME, "--dtype", "bfloat16", "--experts-implementation", implementation,
                     "--json", str(out)]) == 0
        assert "PASS" in capsys.readouterr().out and out.exists()
    with pytest.raises(SystemExit):
        main(["parity", "--model", NAME, "--experts-implementation", "batched_mm"])
