"""The op-level invariance audit: every op the deterministic mode runs gives a row the same bits alone and
inside bigger calls (any offset, 1-4 threads), under every CPU capability level this machine supports and
under MKL's AVX2 code path too. Tolerance 0.0: bitwise is the contract."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lens_det
from lens_det.determinism.audit import (AUDITED_OPS, CHUNK_SHAPES, EXACT_OPS, RAW_OPS, audit, audit_levels, format_rows,
                                        supported_levels)
from tests.helpers import ALL, DTYPES


def test_every_deterministic_op_is_invariant_at_every_cpu_level():
    levels = supported_levels()
    runs = audit_levels(levels, mkl_levels=("auto",)) + audit_levels(levels[-1:], mkl_levels=("AVX2",))
    ran = {run["environment"]["cpu_capability"].lower() for run in runs}
    assert ran == set(levels), f"asked for {levels}, torch ran {ran} (a level fell back)"
    for run in runs:
        env = run["environment"]
        print(f"audit under {env}: {sum(r['passed'] for r in run['rows'])}/{len(run['rows'])} invariant")
        assert "strict" in env["blas"] and "not strict" not in env["blas"], env
        failed = [r for r in run["rows"] if not r["passed"]]
        assert not failed, f"{env}: {failed[:5]}"
        assert len(run["rows"]) == len(AUDITED_OPS) * 2 * 7 + 3 * len(CHUNK_SHAPES) * 2  # + the query-chunk rows


def test_the_audit_sees_the_position_dependence_of_plain_torch_ops():
    """Measured on torch 2.13.0: the SIMD tail of float32 tanh-GELU, SiLU and sigmoid rounds differently on the
    AVX2 and AVX-512 kernels (the 'default' kernels use one scalar path, so there is nothing to see there)."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("ATEN_CPU_CAPABILITY=default runs every element on the same scalar path")
    rows = audit(RAW_OPS, dtypes=(torch.float32,))
    failed = {r.op for r in rows if not r.passed}
    assert {"torch gelu_tanh", "torch silu", "torch sigmoid"} <= failed, format_rows(rows)


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ALL)
def test_the_audit_covers_every_op_a_deterministic_forward_runs(name):
    """Each aten op a cached and an uncached deterministic forward runs is exercised by the audit or is exact
    whatever the layout (EXACT_OPS); a new op in the model fails here until it is audited."""
    audited, used = _AtenOps(), _AtenOps()
    with torch.no_grad(), lens_det.deterministic():
        with audited:
            for fn in AUDITED_OPS.values():
                for dtype in DTYPES:
                    fn(torch.randn(3, 64).to(dtype))
        for dtype in DTYPES:
            model = lens_det.from_config(name, seed=0).to(dtype)
            model.set_use_attn_result(False)
            tokens = torch.randint(0, model.cfg.d_vocab, (2, 6))
            mask = torch.ones_like(tokens)
            mask[0, :2] = 0
            with used:
                model.run_with_cache(tokens, attention_mask=mask, position_ids="mask")
                cache = model.new_cache()
                model(tokens[:, :4], attention_mask=mask[:, :4], kv_cache=cache, position_ids="mask")
                model(tokens[:, 4:], attention_mask=mask, kv_cache=cache, position_ids="mask")
    assert used.ops - audited.ops - EXACT_OPS == set()
