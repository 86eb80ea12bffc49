"""What the CPU kernel tests share: the dtypes the native kernel runs, the skip marker for a
missing extension, the native paths called directly, and the CPU's instruction-set flags."""
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


def cpu_flags() -> set[str]:
    """The first CPU's flags in /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()
