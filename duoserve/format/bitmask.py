"""The on-disk sparse weight encoding: per-row bitmask + packed non-zero values.

Layout (docs/checkpoint-format.md): for W [N, K], `bitmask` is uint8 [N, ceil(K/8)] where bit
k % 8 (LSB first) of byte k // 8 of row n says W[n, k] != 0, and `values` [nnz] holds the
non-zeros in row-major order. Pad bits of the last byte are zero.
"""
from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)  # LSB first


def bitmask_bytes_per_row(k: int) -> int:
    return (k + 7) // 8


def encode_bitmask(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (zeros where pruned) -> (bitmask uint8 [N, ceil(K/8)], values [nnz] in W's dtype)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    nonzero = weight != 0  # [N, K] bool
    values = weight[nonzero].contiguous()  # boolean indexing keeps row-major order
    k8 = bitmask_bytes_per_row(k)
    padded = torch.zeros(n, k8 * 8, dtype=torch.int32, device=weight.device)
    padded[:, :k] = nonzero.to(torch.int32)
    bitmask = (padded.view(n, k8, 8) * _BIT_WEIGHTS.to(weight.device)).sum(-1).to(torch.uint8)
    return bitmask, values


def bitmask_to_bool(bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/8)] -> bool [N, K]."""
    shifts = torch.arange(8, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [N, K8, 8]
    return bits.view(bitmask.shape[0], -1)[:, :k].bool()


def bitmask_popcount(bitmask: torch.Tensor) -> int:
    shifts = torch.arange(8, dtype=torch.int32, device=bitmask.device)
    return int(((bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1).sum())


def pad_bits_clear(bitmask: torch.Tensor, k: int) -> bool:
    """True if no bit beyond column K - 1 is set (a writer bug or corruption otherwise)."""
    if k % 8 == 0:
        return True
    used = (1 << (k % 8)) - 1
    return bool(((bitmask[:, -1].to(torch.int32) & ~used & 0xFF) == 0).all())


def decode_bitmask(bitmask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(bitmask, values) -> dense W [N, K] in values' dtype, zeros where pruned."""
    n, k = shape
    mask = bitmask_to_bool(bitmask, k)  # [N, K]
    dense = torch.zeros(n, k, dtype=values.dtype, device=values.device)
    dense[mask] = values
    return dense
