"""The torch custom op `duoserve::dual_sparse_linear_q`: the dual-sparse linear on int4/int8 codes.

    duoserve::dual_sparse_linear_q(Tensor x, Tensor bitmap, Tensor offsets, Tensor codes,
                                   Tensor scales, Tensor threshold, Tensor? bias, int n, int k,
                                   int bits, int group_size) -> Tensor
    x [T, K] (fp16 / bf16 / fp32), the QPackedWeight tensors (qlayout.py), threshold fp32 0-dim,
    bias [N] | None  ->  y [T, N] = Wq @ where(|x| > threshold, x, 0) + bias in x.dtype, Wq the
    dequantized weight, accumulated in fp32.

A separate op (not new arguments of duoserve::dual_sparse_linear), so that the float op's schema
and every caller of it stay as they are. Dispatch:
    CPU, native extension with this op  -> the C++ walk (kernels/csrc/dual_sparse_q_cpu.cpp,
                                            registered by the extension): codes dequantized in
                                            registers, every token count
    CUDA, Triton importable             -> the Triton GEMM of kernels/triton_q.py (any token
                                            count; correct under TRITON_INTERPRET=1, never timed
                                            on a GPU)
    otherwise, DUOSERVE_KERNEL=reference -> the reference (dequantize to dense fp32, matmul);
                                            one warning
"""
from __future__ import annotations

import logging

import torch

from . import cpu, gpu
from .qlayout import QPackedWeight, unpack_dequantized
from .ops import checked_call
from .reference import dual_sparse_linear_reference
from .settings import kernel_choice

log = logging.getLogger(__name__)
_warned: set[str] = set()
SCHEMA = ("(Tensor x, Tensor bitmap, Tensor offsets, Tensor codes, Tensor scales, Tensor threshold, "
          "Tensor? bias, int n, int k, int bits, int group_size) -> Tensor")
OP = "duoserve::dual_sparse_linear_q"
_FORCE_REFERENCE = kernel_choice() == "reference"


def dual_sparse_linear_q_reference(x: torch.Tensor, packed: QPackedWeight, threshold,
                                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 oracle on the dequantized weight (unpacked transiently; syncs)."""
    return dual_sparse_linear_reference(x, unpack_dequantized(packed), threshold, bias)


def _check(x, k):
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [T, {k}], got {tuple(x.shape)}")


def _reference_impl(x, bitmap, offsets, codes, scales, threshold, bias, n, k, bits, group_size):
    _check(x, k)
    packed = QPackedWeight(n, k, bits, group_size, bitmap, offsets, codes, scales)
    return dual_sparse_linear_q_reference(x.contiguous(), packed, threshold, bias)


def _warn_then_reference(key, msg):
    def impl(*args):
        if not _FORCE_REFERENCE and key not in _warned:
            _warned.add(key)
            log.warning(msg)
        return _reference_impl(*args)
    return impl


def _cuda_impl(x, bitmap, offsets, codes, scales, threshold, bias, n, k, bits, group_size):
    _check(x, k)
    if not _FORCE_REFERENCE and gpu.available():
        from .triton_q import linear_q
        return linear_q(x, bitmap, offsets, codes, scales, threshold, bias, n, k, bits, group_size)
    return _warn_then_reference("cuda", f"duoserve: Triton unavailable ({gpu.import_error()}); quantized weights "
                                "run the pure-torch reference (not CUDA-graph safe)")(
        x, bitmap, offsets, codes, scales, threshold, bias, n, k, bits, group_size)


def _fake(x, bitmap, offsets, codes, scales, threshold, bias, n, k, bits, group_size):
    torch._check(x.shape[-1] == k)
    return x.new_empty((x.shape[0], n))


_native_cpu = False


def native_cpu() -> bool:
    """Whether the CPU kernel is the extension's (decided once, at import)."""
    return _native_cpu


def _register() -> None:
    global _native_cpu
    if not hasattr(torch.ops.duoserve, "dual_sparse_linear_q"):
        torch.library.define(OP, SCHEMA)
    # Loading the extension registers its kernel for this op, if it was built with it.
    _native_cpu = (not _FORCE_REFERENCE and cpu.available()
                   and torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CPU"))
    if not _native_cpu:
        why = cpu.import_error() or "the extension was built before it existed: rebuild it"
        torch.library.impl(OP, "CPU")(_warn_then_reference(
            "cpu", f"duoserve: no native CPU kernel for quantized weights ({why}); using the pure-torch reference"))
    torch.library.impl(OP, "CUDA")(_cuda_impl)
    torch.library.register_fake(OP)(_fake)


_register()
dual_sparse_linear_q_op = torch.ops.duoserve.dual_sparse_linear_q


def dual_sparse_linear_q(x: torch.Tensor, packed: QPackedWeight, threshold,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> y [..., N] = Wq @ where(|x| > t, x, 0) + bias, in x.dtype."""
    x2, threshold = checked_call(x, packed.n, packed.k, threshold, bias)
    y = dual_sparse_linear_q_op(x2, packed.bitmap, packed.offsets, packed.codes, packed.scales, threshold, bias,
                                packed.n, packed.k, packed.bits, packed.group_size)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], packed.n)


def kernel_backend_q(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and not _FORCE_REFERENCE and gpu.available():
        return "Triton GEMM for int4/int8 codes (codes dequantized in registers, any token count)"
    if device.type == "cpu" and native_cpu():
        return ("native CPU kernel for int4/int8 codes (a walk for any token count, codes dequantized in "
                "registers; int4 with bf16 inputs: two columns per vdpbf16ps where the CPU has AVX512-BF16 and "
                "VBMI2; else an AVX-512 VBMI2 decode where it has VBMI2, else scalar)")
    return "pure-torch reference for int4/int8 codes (dequantize + fp32 matmul)"
