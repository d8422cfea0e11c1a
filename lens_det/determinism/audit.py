"""Op-level invariance audit: is every op the deterministic mode runs bitwise the same for a row computed alone
and inside a bigger call, at any row offset and thread count?

Each op in `AUDITED_OPS` takes rows [rows, width] of random values. For each dtype, width and thread count the
audit computes a probe of 1-3 rows alone (one thread) and then inside calls of more rows (up to past ATen's
parallel grain), at varying offsets, and compares bits. `RAW_OPS` are the plain torch ops the deterministic mode
avoids; auditing them shows the audit sees the position dependence it looks for.

`audit_levels()` runs the audit in a fresh process per CPU capability level (`ATEN_CPU_CAPABILITY`) and per
MKL instruction level (`MKL_ENABLE_INSTRUCTIONS`), since both are fixed when a process starts; a level the CPU
lacks falls back silently, so each run reports the level that actually ran.

    python -m lens_det.determinism.audit [--raw] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lens_det import ops

WIDTHS = (1, 7, 64, 96, 112, 130, 1000)
THREADS = (1, 2, 3, 4)
DTYPES = (torch.float32, torch.bfloat16)


def _weights(width: int, dtype, seed: int = 7, n_out: int = 48):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_out, width, generator=g) / width**0.5).to(dtype), torch.randn(n_out, generator=g).to(dtype)


def _norm_weight(width: int, dtype):
    return (torch.randn(width, generator=torch.Generator().manual_seed(3)) * 0.1).to(dtype)


def _attention(fn):
    """Rows become batch rows of a 2-head attention: query j of a row attends to the row's own keys."""
    def run(x):
        if x.shape[1] < 16:  # at least one key of d_head 8 for 2 heads
            x = x.repeat(1, -(-16 // x.shape[1]))
        b, width = x.shape
        d = 8
        n = width // (2 * d)
        qk = x[:, : 2 * d * n].reshape(b, 2, n, d)
        return fn(qk, qk.flip(-1), torch.arange(n).expand(b, n))
    return run


def _scores(q, k, key_pos):
    return ops.attention_scores(q, k, 0.125)


def _softmax(q, k, key_pos):
    return ops.softmax(ops.attention_scores(q, k, 0.125), key_pos)


def _attend(q, k, key_pos):
    return ops.attend(ops.softmax(ops.attention_scores(q, k, 0.125), key_pos), k, key_pos)


AUDITED_OPS = {
    "linear": lambda x: ops.linear(x, *_weights(x.shape[-1], x.dtype)),
    "linear (no bias)": lambda x: ops.linear(x, _weights(x.shape[-1], x.dtype)[0]),
    # few output columns: MKL splits such GEMMs by thread count unless lens_det caps the threads (lens_det.blas)
    "linear (32 outputs)": lambda x: ops.linear(x, *_weights(x.shape[-1], x.dtype, n_out=32)),
    "gelu_tanh": ops.gelu_tanh,
    "gelu_erf": ops.gelu_erf,
    "bloom_gelu": ops.bloom_gelu,
    "tanh": ops.tanh,
    "exp": lambda x: ops.pointwise(torch.exp, x),
    "cos": lambda x: ops.pointwise(torch.cos, x),
    "sin": lambda x: ops.pointwise(torch.sin, x),
    "rsqrt": lambda x: ops.pointwise(torch.rsqrt, x.abs() + 1e-3),
    "sqrt": lambda x: (x.abs() + 1e-3).sqrt(),
    "mul, add, div": lambda x: (x * 1.7 + 0.3) / 1.3,
    "cast": lambda x: x.float().mul(1.1).to(x.dtype),
    "mean_square": ops.mean_square,
    "rms_norm (1 + w)": lambda x: ops.rms_norm(x, _norm_weight(x.shape[-1], x.dtype), 1e-6, True),
    "rms_norm (w)": lambda x: ops.rms_norm(x, _norm_weight(x.shape[-1], x.dtype), 1e-6, False),
    "rms_norm (pow, w)": lambda x: ops.rms_norm(x, _norm_weight(x.shape[-1], x.dtype), 1e-6, False, inv_sqrt="pow"),
    "rms_norm (pow, no weight)": lambda x: ops.rms_norm(x, None, 1e-6, False, inv_sqrt="pow"),
    "layer_norm": lambda x: ops.layer_norm(x, _norm_weight(x.shape[-1], x.dtype), _norm_weight(x.shape[-1], x.dtype),
                                           1e-5),
    "norm_scale": lambda x: ops.norm_scale(x, 1e-5, center=True),
    "attention_scores": _attention(_scores),
    "softmax": _attention(_softmax),
    "softmax_fp32 (MoE router)": ops.softmax_fp32,
    "attend": _attention(_attend),
    # Gemma 3n: the gate's gaussian top-k (mean and population std over the row) and AltUp's magnitude match
    "gaussian top-k": lambda x: torch.relu(x - (torch.mean(x, -1, keepdim=True)
                                                + torch.std(x, -1, keepdim=True, unbiased=False) * 1.6)),
    "magnitude match": lambda x: (x * torch.mean(x**2, -1, keepdim=True) ** 0.5)
    / torch.sqrt(torch.mean(x**2, -1, keepdim=True).clamp(min=1e-5)),
}

# aten ops a deterministic forward runs besides those AUDITED_OPS exercises; exact whatever the layout: data
# movement, sign flips, and integer/bool arithmetic on masks and positions (tests check this list is complete).
EXACT_OPS = frozenset({
    "aten.all", "aten.any", "aten.bitwise_and", "aten.bitwise_or", "aten.clone", "aten.copy_", "aten.cumsum",
    "aten.embedding", "aten.eq", "aten.equal", "aten.ge", "aten.gt", "aten.le", "aten.lt", "aten.masked_fill",
    "aten.min", "aten.neg", "aten.new_empty", "aten.select", "aten.zeros", "aten.zeros_like", "aten.index",
    "aten.ones", "aten.ones_like", "aten.full", "aten.empty", "aten.stack", "aten.detach", "aten.lift_fresh",
    "aten.clamp", "aten.sum", "aten.argmax", "aten.item",
    # MoE routing and dispatch (deterministic mode): selection and data movement
    "aten.topk", "aten.nonzero", "aten.index_put_", "aten._unique2", "aten.unbind", "aten.aminmax", "aten.permute",
    # Gemma 3n: relu (exact), AltUp's stream repeat, and the icdf of the 0-d sparsity constant (erfinv on one
    # scalar, its argument check _is_all_true)
    "aten.relu", "aten.repeat", "aten.erfinv", "aten._is_all_true",
    "aten.add_",  # AltUp's in-place adds (elementwise, as the audited add)
})

RAW_OPS = {
    "torch gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "torch gelu_erf": F.gelu,
    "torch silu": F.silu,
    "torch sigmoid": torch.sigmoid,
    "torch tanh": torch.tanh,
    "torch exp": torch.exp,
}


@dataclass
class AuditRow:
    op: str
    dtype: str
    width: int
    passed: bool
    failure: str = ""  # the first case that differed: rows, offset, threads, max |diff|


def _cases(width: int, gen: torch.Generator):
    """(rows, offset) placements: small and large calls, the largest past ATen's 32768-element grain."""
    big = max(16, -(-40000 // width))
    rows = [2, 5, 9, 16, 33, min(big, 4096)]
    return [(r, int(torch.randint(0, r + 1, (1,), generator=gen))) for r in rows]


def audit_op(name: str, fn, dtype, width: int, threads=THREADS, seed: int = 0) -> AuditRow:
    gen = torch.Generator().manual_seed(seed)
    n_probe = 1 + width % 3
    probe = torch.randn(n_probe, width, generator=gen).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = fn(probe)
        for n in threads:
            torch.set_num_threads(n)
            for rows, offset in _cases(width, gen):
                x = torch.randn(rows + n_probe, width, generator=gen).to(dtype)
                x[offset : offset + n_probe] = probe
                inside = fn(x)[offset : offset + n_probe]
                if not torch.equal(inside, alone):
                    diff = (inside.float() - alone.float()).abs().max().item()
                    return AuditRow(name, str(dtype).replace("torch.", ""), width, False,
                                    f"{rows + n_probe} rows, offset {offset}, {n} threads: max |diff| {diff:.2g}")
    finally:
        torch.set_num_threads(before)
    return AuditRow(name, str(dtype).replace("torch.", ""), width, True)


def audit(op_table=None, widths=WIDTHS, dtypes=DTYPES, threads=THREADS) -> list[AuditRow]:
    """Audit each op of `op_table` (default: AUDITED_OPS, in deterministic mode) in this process."""
    op_table = AUDITED_OPS if op_table is None else op_table
    rows = []
    with torch.no_grad(), ops.deterministic():
        for name, fn in op_table.items():
            for dtype in dtypes:
                for width in widths:
                    rows.append(audit_op(name, fn, dtype, width, threads))
    return rows


CHUNK_SHAPES = ((4, 300, 64), (2, 600, 128), (1, 530, 256))  # (heads, keys = queries, d_head)


def audit_query_chunks(threads=THREADS, dtypes=DTYPES, seed: int = 0) -> list[AuditRow]:
    """The HF-exact eager attention ops (not the deterministic ones) over query chunks, as the eager core runs them
    when no hook needs the whole pattern (lens_det.components.attention.query_chunks): each chunk's scores (plain
    and with Bloom's ALiBi baddbmm), softmax and probs @ V must equal the same rows of the all-at-once call. This
    rests on MKL's strict reproducibility mode; one row per (op, dtype, d_head)."""
    from lens_det.components.attention import EAGER_QUERY_CHUNK, query_chunks

    gen = torch.Generator().manual_seed(seed)
    out = []
    before = torch.get_num_threads()
    try:
        for dtype in dtypes:
            for heads, n, d in CHUNK_SHAPES:
                q, k, v = (torch.randn(2, heads, n, d, generator=gen).to(dtype) for _ in range(3))
                bias = torch.randn(2 * heads, 1, n, generator=gen).to(dtype)
                mask = torch.where(torch.rand(2, 1, n, n, generator=gen) < 0.9, 0.0, torch.finfo(dtype).min).to(dtype)
                failure = {}
                for threads_now in threads:
                    torch.set_num_threads(threads_now)
                    calls = {"scores": lambda q_: ops.attention_scores(q_, k, d**-0.5),
                             "scores (ALiBi)": lambda q_: ops.attention_scores(q_, k, d**-0.5, bias)}
                    for name, fn in calls.items():
                        whole = fn(q)
                        for rows in query_chunks(n, min(EAGER_QUERY_CHUNK, n // 2)):
                            if name not in failure and not torch.equal(fn(q[:, :, rows]), whole[:, :, rows]):
                                failure[name] = f"rows {rows.start}:{rows.stop} of {n}, {threads_now} threads"
                    probs = ops.softmax(ops.attention_scores(q, k, d**-0.5) + mask)
                    whole = ops.attend(probs, v)
                    for rows in query_chunks(n, min(EAGER_QUERY_CHUNK, n // 2)):
                        part = ops.softmax(ops.attention_scores(q[:, :, rows], k, d**-0.5) + mask[:, :, rows])
                        if "softmax, probs @ V" not in failure and not (
                                torch.equal(part, probs[:, :, rows])
                                and torch.equal(ops.attend(part, v), whole[:, :, rows])):
                            failure["softmax, probs @ V"] = (f"rows {rows.start}:{rows.stop} of {n}, "
                                                             f"{threads_now} threads")
                for name in ("scores", "scores (ALiBi)", "softmax, probs @ V"):
                    out.append(AuditRow(f"eager query chunks: {name}", str(dtype).replace("torch.", ""), d,
                                        name not in failure, failure.get(name, "")))
    finally:
        torch.set_num_threads(before)
    return out


def environment() -> dict:
    """What the invariance was checked under: CPU capability that ran, threads, BLAS mode."""
    from lens_det.blas import blas_mode

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "blas": str(blas_mode()), "torch": torch.__version__,
            "mkl_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "auto")}


def supported_levels() -> list[str]:
    """ATEN_CPU_CAPABILITY values this CPU runs (torch reports the highest one it picked by default)."""
    top = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(top) + 1] if top in order else ["default", top]


def audit_levels(levels=None, mkl_levels=("auto", "AVX2"), raw: bool = False, timeout: float = 600) -> list[dict]:
    """Run the audit in a fresh process per (CPU capability, MKL instruction level); one dict per run with
    `environment` (what actually ran) and `rows`."""
    results = []
    for level in levels or supported_levels():
        for mkl in mkl_levels:
            env = {**os.environ, "ATEN_CPU_CAPABILITY": level}
            env.pop("MKL_ENABLE_INSTRUCTIONS", None)
            if mkl != "auto":
                env["MKL_ENABLE_INSTRUCTIONS"] = mkl
            cmd = [sys.executable, "-m", "lens_det.determinism.audit", "--json"] + (["--raw"] if raw else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=True)
            results.append({"requested": {"cpu_capability": level, "mkl_instructions": mkl}, **json.loads(out.stdout)})
    return results


def format_rows(rows: list[AuditRow]) -> str:
    failed = [r for r in rows if not r.passed]
    lines = [f"{len(rows) - len(failed)}/{len(rows)} (op, dtype, width) combinations bitwise invariant"]
    lines += [f"  DIFFERS  {r.op:<18} {r.dtype:<9} width {r.width:<5} {r.failure}" for r in failed]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", action="store_true",
                        help="audit the plain torch ops instead (shows the audit's teeth)")
    parser.add_argument("--json", action="store_true", help="print the environment and rows as JSON")
    args = parser.parse_args(argv)
    rows = audit(RAW_OPS) if args.raw else audit() + audit_query_chunks()
    if args.json:
        print(json.dumps({"environment": environment(), "rows": [asdict(r) for r in rows]}))
    else:
        print(environment())
        print(format_rows(rows))
    return 0 if args.raw or all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
