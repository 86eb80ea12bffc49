"""CPU backend: loads the native extension (kernels/csrc, built by `pip install`) lazily.

Two paths behind `linear`, both on the packed layout (layout.py), chosen by the token count T:
  T <= SPARSE_MAX_TOKENS: the native spMspV walk (AVX-512 expand-loads, or scalar where the CPU
    lacks AVX-512 VBMI2): per row block, only the columns active for some token are read.
  larger T (prefill): row-block chunks are decompressed by the native code into a transposed dense
    scratch [K, rows] and multiplied with torch.matmul; the scratch is bounded (never a second
    dense copy of the whole weight). Cutover measured with `python -m duoserve.kernels.bench`.
"""
from __future__ import annotations

import os

import torch

DTYPES = (torch.bfloat16, torch.float32)
SPARSE_MAX_TOKENS = int(os.environ.get("DUOSERVE_CPU_SPARSE_MAX_TOKENS", "32"))
SCRATCH_ELEMENTS = 1 << 22  # decompressed tile budget for the prefill path (8 MiB in bf16)

_ext = None
_error: str | None = None


def _load():
    global _ext, _error
    if _ext is None and _error is None:
        if os.environ.get("DUOSERVE_DISABLE_CPU_KERNEL") == "1":
            _error = "disabled by DUOSERVE_DISABLE_CPU_KERNEL=1"
            return None
        try:
            from . import _cpu_kernels  # built by setup.py from kernels/csrc
            _ext = _cpu_kernels
        except ImportError as exc:  # not built (DUOSERVE_SKIP_CPU_KERNEL=1, no compiler)
            _error = f"{type(exc).__name__}: {exc}"
    return _ext


def available() -> bool:
    return _load() is not None


def import_error() -> str | None:
    _load()
    return _error


def isa() -> str:
    """The instruction set the native kernel runs with here ('avx512' or 'scalar')."""
    return _load().isa() if available() else "none"


def linear(x, bitmap, offsets, values, threshold, bias, n: int, k: int, force_scalar: bool = False):
    """x [T, K] bf16/fp32 -> y [T, N] in x.dtype = W @ where(|x| > t, x, 0) + bias."""
    ext = _load()
    if x.shape[0] <= SPARSE_MAX_TOKENS:
        return ext.spmspv(x, bitmap, offsets, values, threshold, bias, n, force_scalar)
    xm = ext.mask_input(x, threshold)  # [T, K] masked, x.dtype
    y = torch.empty(x.shape[0], n, dtype=x.dtype)  # [T, N]
    nb = bitmap.shape[0]
    blocks_per_chunk = max(1, SCRATCH_ELEMENTS // (k * bitmap.shape[2] * 32))
    rows_per_block = bitmap.shape[2] * 32
    for rb0 in range(0, nb, blocks_per_chunk):
        rb1 = min(nb, rb0 + blocks_per_chunk)
        wt = ext.unpack_transposed(bitmap, offsets, values, rb0, rb1)  # [K, rows] x.dtype
        r0, r1 = rb0 * rows_per_block, min(n, rb1 * rows_per_block)
        y[:, r0:r1] = torch.matmul(xm, wt[:, : r1 - r0])  # [T, rows]
    if bias is not None:
        y += bias
    return y
