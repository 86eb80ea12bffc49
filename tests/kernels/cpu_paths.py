"""What the CPU kernel tests share: the dtypes the native kernel runs, the skip marker for a
missing extension, the native paths called directly (the CPU flags: duoserve.kernels.cpu_features)."""
import pytest
import torch

from duoserve.kernels import cpu

DTYPES = [torch.bfloat16, torch.float32]
needs_ext = pytest.mark.skipif(not cpu.available(), reason=f"CPU extension: {cpu.import_error()}")


def spmspv_path(force_scalar: bool):
    """The spMspV walk as run_cases calls an implementation: (x, packed, threshold, bias) -> y."""
    return lambda x, p, t, b: cpu.spmspv(x, p.bitmap, p.offsets, p.values, t, b, p.n, force_scalar)


def tiled_path(x, p, t, b):
    """The decompress-and-matmul path, called the same way."""
    return cpu.tiled(x, p.bitmap, p.offsets, p.values, t, b, p.n)
