"""The torch custom op `duoserve::dual_sparse_linear` and where each device's kernel comes from.

    duoserve::dual_sparse_linear(Tensor x, Tensor bitmap, Tensor offsets, Tensor values,
                                 Tensor threshold, Tensor? bias, int n, int k) -> Tensor
    x [T, K] (fp16 / bf16 / fp32), the PackedWeight tensors (layout.py), threshold fp32 0-dim,
    bias [N] | None  ->  y [T, N] = W @ where(|x| > threshold, x, 0) + bias in x.dtype.

Only tensors and ints cross the op boundary and the fake (meta) implementation gives the output
shape without touching data, so torch.compile (vLLM's default) traces through it and CUDA graphs
capture it (the GPU decode path has no host sync, no nonzero(), no data-dependent shapes).

Device dispatch, all decided here (by the dispatcher key, then by `_cuda_impl`/`_cpu_impl`):
    CPU,  native extension built  -> C++ kernel registered by the extension itself (cpu.py;
                                     spMspV for T <= cutover, tiled decompress + GEMM above)
    CPU,  no extension            -> reference (unpack + fp32 matmul), one warning
    CUDA, Triton importable       -> gpu.linear (Triton spMspV decode for T <= cutover,
                                     Triton decompress-on-the-fly tl.dot GEMM above)
    CUDA, no Triton / other       -> reference, one warning (syncs: not CUDA-graph safe)
DUOSERVE_KERNEL=reference forces the reference everywhere (debugging; the CPU extension is then not
loaded at all); DUOSERVE_KERNEL=native (the default) uses the table above.
"""
from __future__ import annotations

import logging
import os

import torch

from . import cpu, gpu
from .layout import BLOCK_ROWS, PackedWeight
from .reference import as_threshold, dual_sparse_linear_packed_reference
from .settings import kernel_choice

log = logging.getLogger(__name__)
_warned: set[str] = set()
SCHEMA = ("(Tensor x, Tensor bitmap, Tensor offsets, Tensor values, Tensor threshold, Tensor? bias, "
          "int n, int k) -> Tensor")
_FORCE_REFERENCE = kernel_choice() == "reference"  # a bad value raises at import, naming the variable


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def _reference(x, bitmap, offsets, values, threshold, bias, n, k):
    packed = PackedWeight(n=n, k=k, bitmap=bitmap, offsets=offsets, values=values)
    return dual_sparse_linear_packed_reference(x, packed, threshold, bias)


def _check(x, values, k):
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [T, {k}], got {tuple(x.shape)}")
    if values.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but the packed weight is {values.dtype}")
    if values.dim() != 1 or values.numel() < BLOCK_ROWS:  # the kernels read up to R past a column
        raise ValueError(f"values must be 1-D with {BLOCK_ROWS} elements of trailing padding "
                         f"(kernels/layout.py), got shape {tuple(values.shape)}")


def _cpu_impl(x, bitmap, offsets, values, threshold, bias, n, k):
    """CPU kernel when the extension is missing (or the reference is forced)."""
    _check(x, values, k)
    if not _FORCE_REFERENCE:
        _warn_once("cpu-ext", "duoserve CPU kernel extension not built "
                   f"({cpu.import_error()}); using the slow pure-torch reference")
    return _reference(x.contiguous(), bitmap, offsets, values, threshold, bias, n, k)


def _cuda_impl(x, bitmap, offsets, values, threshold, bias, n, k):
    _check(x, values, k)
    x = x.contiguous()
    if not _FORCE_REFERENCE:
        if gpu.available():
            return gpu.linear(x, bitmap, offsets, values, threshold, bias, n, k)
        _warn_once("triton", f"Triton unavailable ({gpu.import_error()}); "
                   "using the slow pure-torch reference (not CUDA-graph safe)")
    return _reference(x, bitmap, offsets, values, threshold, bias, n, k)


def _fake(x, bitmap, offsets, values, threshold, bias, n, k):
    torch._check(x.shape[-1] == k)
    return x.new_empty((x.shape[0], n))


def _register() -> None:
    # The one definition of the schema; then loading the native extension registers its CPU kernel.
    if not hasattr(torch.ops.duoserve, "dual_sparse_linear"):
        torch.library.define("duoserve::dual_sparse_linear", SCHEMA)
    native_cpu = cpu.available() and not _FORCE_REFERENCE
    if not native_cpu:
        torch.library.impl("duoserve::dual_sparse_linear", "CPU")(_cpu_impl)
    torch.library.impl("duoserve::dual_sparse_linear", "CUDA")(_cuda_impl)
    torch.library.register_fake("duoserve::dual_sparse_linear")(_fake)


_register()
dual_sparse_linear_op = torch.ops.duoserve.dual_sparse_linear


def kernel_backend(device: torch.device | str, dtype: torch.dtype) -> str:
    """What runs the op for weights of `dtype` on `device`, in words (for load logs and reports)."""
    device = torch.device(device)
    if _FORCE_REFERENCE:
        return "pure-torch reference (DUOSERVE_KERNEL=reference)"
    if device.type == "cuda":
        if not gpu.available():
            return f"pure-torch reference (Triton unavailable: {gpu.import_error()})"
        choice = ("the faster measured per shape and token bucket" if gpu._TUNE else
                  "timing off (DUOSERVE_GPU_TUNE=0): decode at 1 token, GEMM above")
        return (f"Triton kernels (decode spMspV or GEMM up to {gpu.DECODE_MAX_TOKENS} tokens a call, "
                f"GEMM or tiled + cuBLAS above; {choice})")
    if device.type != "cpu":
        return f"no duoserve kernel for {device.type}"
    if not cpu.available():
        return f"pure-torch reference (CPU extension not built: {cpu.import_error()})"
    if dtype not in cpu.DTYPES:
        return f"native CPU kernel, {dtype} through the decompress + fp32 matmul path"
    tokens = cpu.panel_walk_tokens() if dtype == torch.bfloat16 else None
    how = " (the minimum measured on this machine)" if tokens and cpu.bf16_dot_min_measured() else ""
    panel = f", the bf16 panel walk (vdpbf16ps) at {tokens[0]}-{tokens[1]} tokens{how}" if tokens else ""
    most = max(cpu.sparse_max_tokens(dtype), tokens[1] if tokens else 0)
    max_inactive, min_span = cpu.walk_all()
    walk = ("inactive columns always skipped" if max_inactive <= 0 else
            f"every column walked when under {max_inactive:g} of them are inactive and a weight's spans "
            f"average over {min_span:g} B")
    return (f"native CPU kernel ({cpu.isa()}, {cpu.decoder(dtype)} decoder; spMspV up to "
            f"{most} tokens a call{panel}, decompress + matmul above; {walk})")


def checked_call(x: torch.Tensor, n: int, k: int, threshold, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks and conversions both linear ops make: x [..., K] -> ([T, K], the threshold as an fp32
    0-dim tensor on x's device, kept as is when it already is one: no copy per call)."""
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight has {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}] (one per output), got {tuple(bias.shape)}")
    if not (isinstance(threshold, torch.Tensor) and threshold.dim() == 0
            and threshold.dtype == torch.float32 and threshold.device == x.device):
        threshold = as_threshold(threshold, x.device)
    return (x if x.dim() == 2 else x.reshape(-1, k)), threshold


def dual_sparse_linear(x: torch.Tensor, packed: PackedWeight, threshold,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] -> y [..., N] = W @ where(|x| > t, x, 0) + bias, in x.dtype.

    threshold: an fp32 0-dim tensor on x's device (no copy per call; what CUDA graphs need) or a
    float.
    """
    x2, threshold = checked_call(x, packed.n, packed.k, threshold, bias)
    y = dual_sparse_linear_op(x2, packed.bitmap, packed.offsets, packed.values, threshold, bias,
                              packed.n, packed.k)  # [T, N]
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], packed.n)
