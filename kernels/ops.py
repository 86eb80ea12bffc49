"""Torch custom ops for the dual-sparse linear, and the one function that dispatches by device.

`duoserve::dual_sparse_linear(x, bitmap, offsets, values, threshold, bias, n, k) -> y`
    x [T, K] (fp16 / bf16 / fp32), the PackedWeight tensors (layout.py), threshold fp32 0-dim,
    bias [N] | None, n = N, k = K  ->  y [T, N] in x.dtype.
Only tensors and ints cross the op boundary, and the fake implementation gives the output shape
without touching data, so torch.compile (vLLM's default) traces through it and CUDA graphs can
capture it (the GPU decode path has no host sync).

Dispatch (`_dispatch`, the only place that decides):
    CPU, bf16/fp32, native extension built  -> cpu.linear (sparse walk or tile decompress + GEMM)
    CUDA, Triton importable                 -> gpu.linear (Triton decode spMspV for T <= cutover,
                                               Triton decompress-on-the-fly tl.dot GEMM above)
    anything else (fp16 on CPU, no ext.)    -> reference (unpack + fp32 matmul)
"""
from __future__ import annotations

import logging
import os

import torch

from . import cpu, gpu
from .layout import PackedWeight
from .reference import as_threshold, dual_sparse_linear_packed_reference

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def _force_reference() -> bool:
    return os.environ.get("DUOSERVE_KERNEL", "") == "reference"


def _reference(x, bitmap, offsets, values, threshold, bias, n, k):
    packed = PackedWeight(n=n, k=k, bitmap=bitmap, offsets=offsets, values=values)
    return dual_sparse_linear_packed_reference(x, packed, threshold, bias)


def _dispatch(x: torch.Tensor, bitmap, offsets, values, threshold, bias, n: int, k: int):
    """x [T, K] -> y [T, N]: picks the kernel for x's device, dtype and T."""
    if values.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but the packed weight is {values.dtype}")
    if _force_reference():
        return _reference(x, bitmap, offsets, values, threshold, bias, n, k)
    if x.device.type == "cpu":
        if x.dtype in cpu.DTYPES and cpu.available():
            return cpu.linear(x, bitmap, offsets, values, threshold, bias, n, k)
        if x.dtype in cpu.DTYPES:
            _warn_once("cpu-ext", "duoserve CPU kernel extension not built "
                       f"({cpu.import_error()}); using the slow pure-torch reference")
    elif x.device.type == "cuda":
        if gpu.available():
            return gpu.linear(x, bitmap, offsets, values, threshold, bias, n, k)
        _warn_once("triton", f"Triton unavailable ({gpu.import_error()}); "
                   "using the slow pure-torch reference (not CUDA-graph safe)")
    return _reference(x, bitmap, offsets, values, threshold, bias, n, k)


@torch.library.custom_op("duoserve::dual_sparse_linear", mutates_args=())
def dual_sparse_linear_op(x: torch.Tensor, bitmap: torch.Tensor, offsets: torch.Tensor,
                          values: torch.Tensor, threshold: torch.Tensor,
                          bias: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
    """y [T, N] = W @ where(|x| > threshold, x, 0) + bias; see the module docstring."""
    return _dispatch(x.contiguous(), bitmap, offsets, values, threshold, bias, n, k)


@dual_sparse_linear_op.register_fake
def _(x, bitmap, offsets, values, threshold, bias, n, k):
    torch._check(x.shape[-1] == k)
    return x.new_empty((x.shape[0], n))


def dual_sparse_linear(x: torch.Tensor, packed: PackedWeight, threshold,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> y [..., N] = W @ where(|x| > t, x, 0) + bias, in x.dtype.

    threshold: an fp32 0-dim tensor (on x's device, for CUDA graphs) or a float.
    """
    if x.shape[-1] != packed.k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight has {packed.k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.k)  # [T, K]
    t = as_threshold(threshold, x.device)
    y = dual_sparse_linear_op(x2, packed.bitmap, packed.offsets, packed.values, t, bias,
                              packed.n, packed.k)  # [T, N]
    return y.reshape(*lead, packed.n)
