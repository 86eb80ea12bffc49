"""CUDA backend (Triton). The kernels land in triton_kernels.py; until then CUDA uses the reference."""
from __future__ import annotations


def available() -> bool:
    return False


def import_error() -> str | None:
    return "Triton kernels not implemented yet"


def linear(x, bitmap, offsets, values, threshold, bias, n, k):
    raise NotImplementedError
