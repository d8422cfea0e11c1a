"""Reproducible BLAS: MKL's strict conditional-numerical-reproducibility (CNR) mode.

Measured on torch 2.13.0's CPU build (MKL 2024.2): a float32 GEMM row's bits depend on the call's row count
(in shape-dependent classes, e.g. {8}, {16..128}, {256, 512} for K=1024 on an AVX-512 Xeon), on the row's
position inside the call (MKL's AVX2 micro-kernel takes 6 rows at a time; rows 6-7 of an 8-row call take an
edge path) and, for 16+ rows, on the thread count. Padding rows, K blocking or fixed-size row tiles each
fixed some of this on one MKL code path and not on another. MKL's strict CNR mode
(`MKL_CBWR=AUTO,STRICT`) fixed all of it on both the AVX-512 and the AVX2 paths, at no measurable cost.

The mode can only be chosen before MKL's first GEMM in the process, so `import lens_det` chooses it (through
MKL's `mkl_cbwr_set`, exported by libtorch) unless `MKL_CBWR` is set in the environment, which is respected.
Set `LENS_DET_MKL_CBWR=0` to leave MKL alone. The deterministic mode checks the mode on entry.

Strict CNR does not cover everything: on an AMD EPYC (AVX-512, MKL's AUTO branch) a GEMM with few output columns
per thread (N / threads below about 16, e.g. N = 32 on 3 threads, N = 64 on 8) changes bits with the thread
count, strict mode or not (MKL then splits the work another way). `gemm_threads(n)` caps MKL's threads for one
call so that every thread gets at least COLUMNS_PER_THREAD output columns; with one thread nothing is split.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from dataclasses import dataclass

import torch

_AUTO, _STRICT, _ALL = 2, 0x10000, -1
COLUMNS_PER_THREAD = 64  # 4x the measured threshold (module docstring)
_MODE_CHANGE_FAILURE = -8


def _mkl_function(name: str):
    """An MKL entry point exported by libtorch_cpu (int -> int), or None (another BLAS, or not exported)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        fn = getattr(ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")), name)
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
    return fn


@functools.cache
def _mkl():
    """MKL's CNR entry points (get, set), or None."""
    get, set_ = _mkl_function("mkl_serv_cbwr_get"), _mkl_function("mkl_serv_cbwr_set")
    return None if get is None or set_ is None else (get, set_)


@functools.cache
def _mkl_local_threads():
    """MKL's thread-local thread count setter, or None."""
    return _mkl_function("MKL_Set_Num_Threads_Local")


@contextlib.contextmanager
def gemm_threads(n_columns: int):
    """Run the GEMMs inside on at most n_columns // COLUMNS_PER_THREAD MKL threads (at least one), on this thread
    only; MKL's previous setting is restored after."""
    local = _mkl_local_threads()
    cap = max(1, n_columns // COLUMNS_PER_THREAD)
    if local is None or cap >= torch.get_num_threads():
        yield
        return
    previous = local(cap)
    try:
        yield
    finally:
        local(previous)


@dataclass(frozen=True)
class BlasMode:
    backend: str  # "mkl" or "other"
    strict: bool  # MKL strict CNR is on
    detail: str

    def __str__(self) -> str:
        return self.detail


def blas_mode() -> BlasMode:
    mkl = _mkl()
    if mkl is None:
        return BlasMode("other", False, "BLAS is not MKL: invariance rests on this BLAS (check with the audit)")
    mode = mkl[0](_ALL)
    strict = bool(mode & _STRICT)
    return BlasMode("mkl", strict, f"MKL CNR mode {mode:#x} ({'strict' if strict else 'not strict'})")


def use_reproducible_blas() -> int | None:
    """Put MKL in strict CNR mode (AUTO branch) unless the user chose a mode; returns MKL's status code (0 =
    set), or None when nothing was attempted."""
    if os.environ.get("LENS_DET_MKL_CBWR", "1") == "0" or "MKL_CBWR" in os.environ:
        return None
    mkl = _mkl()
    if mkl is None or mkl[0](_ALL) & _STRICT:
        return None
    return mkl[1](_AUTO | _STRICT)


def require_reproducible_blas() -> None:
    """Raise when the BLAS is MKL without strict CNR (its GEMM rows then depend on the batch and threads)."""
    mode = blas_mode()
    if mode.backend == "mkl" and not mode.strict:
        if use_reproducible_blas() == 0:  # MKL has not run a GEMM yet: it can still be switched
            return
        raise RuntimeError(
            f"deterministic mode needs MKL's strict reproducibility mode, but {mode}: a matrix multiply ran before "
            "lens_det was imported (or MKL_CBWR / LENS_DET_MKL_CBWR=0 chose another mode). Import lens_det before "
            "running any torch matmul, or start Python with MKL_CBWR=AUTO,STRICT in the environment."
        )
