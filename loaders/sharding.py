"""Tensor-parallel slices of the on-disk format: which part of a module a rank holds, and cutting it.

vLLM's parallel layers split a linear [N, K] by rank: column-parallel layers (qkv_proj,
gate_up_proj) hold a block of output rows of each shard, row-parallel layers (o_proj, down_proj) a
block of input columns. A rank's part of a bitmask-encoded weight is again a bitmask-encoded
weight, but how many values it holds depends on where the non-zeros fall, and vLLM allocates
parameters before it reads a tensor. So the duoserve linear method reads each shard's whole
on-disk tensors as they arrive (vLLM's loader reads whole tensors anyway), cuts this rank's part
with the functions here as soon as both of a shard's tensors are in, and keeps only that part
(loaders/linear.py). No format change: the checkpoint stays the single-device one.

Thresholds need no slicing: the rule x_k -> x_k if |x_k| > t else 0 is elementwise with one t per
shard, so a column-parallel rank (whole input) and a row-parallel rank (its input columns) apply
the same t to the same elements as one device does: exact.

No vLLM import here (the unit tests run without an engine).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from duoserve.format.bitmask import bitmask_to_bool


@dataclass(frozen=True)
class RankSlice:
    """Rows [row_start, row_end) and columns [col_start, col_end) of a shard's [N, K] weight."""

    row_start: int
    row_end: int
    col_start: int
    col_end: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.row_end - self.row_start, self.col_end - self.col_start

    def is_whole(self, shape: tuple[int, int]) -> bool:
        return (self.row_start, self.row_end, self.col_start, self.col_end) == (0, shape[0], 0, shape[1])


def rank_slice(full: tuple[int, int], local: tuple[int, int], row_part: int, col_part: int) -> RankSlice:
    """The block of a [N, K] shard that a rank holds, given the rank's local [n, k] (from vLLM's
    partition sizes) and its part index along rows and along columns (0 where that dim is whole).

    Raises ValueError when the local size does not divide the full one or the part is out of range
    (a checkpoint that does not belong to the model config, or a TP size that does not split it).
    """
    (n, k), (n_loc, k_loc) = full, local
    for what, whole, part_size, part in (("rows", n, n_loc, row_part), ("columns", k, k_loc, col_part)):
        if part_size <= 0 or whole % part_size or not 0 <= part < whole // part_size:
            raise ValueError(f"{what}: a rank's part of {part_size} (part {part}) does not split {whole}")
    return RankSlice(row_part * n_loc, (row_part + 1) * n_loc, col_part * k_loc, (col_part + 1) * k_loc)


def bool_to_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> uint8 [N, ceil(K/8)], bit k % 8 (LSB first) of byte k // 8, pad bits clear."""
    n, k = mask.shape
    k8 = (k + 7) // 8
    padded = torch.zeros(n, k8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :k] = mask
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded.view(n, k8, 8) * weights).sum(-1, dtype=torch.uint8)


_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)  # set bits per byte


def row_value_offsets(bitmask: torch.Tensor) -> torch.Tensor:
    """int64 [N + 1]: where each row's values start in the row-major values (prefix sum of the
    per-row popcounts), so rows [a, b) own values [off[a], off[b]) and off[N] is the shard's nnz.
    A byte lookup: 4 bytes of index per 8 weights, transient."""
    per_byte = _POPCOUNT8.to(bitmask.device)[bitmask.to(torch.int32)]  # [N, ceil(K/8)] uint8
    per_row = per_byte.sum(1, dtype=torch.int64)  # [N]
    return torch.cat([per_row.new_zeros(1), torch.cumsum(per_row, 0)])


def slice_bitmask(bitmask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], sl: RankSlice,
                  offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard's (bitmask [N, ceil(K/8)], values [nnz]) -> the same encoding of W[rows, cols].

    Rows only (column-parallel layers): the bitmask's rows and one contiguous run of values, found
    from the per-row popcounts: O(N * K / 8), no copy of the rest. Columns (row-parallel layers):
    the rows' mask is decoded to bool [n, K] (1 byte per weight, transient), the values of the
    kept columns picked in row-major order and the bitmask re-encoded from column col_start (which
    need not be a multiple of 8). offsets: row_value_offsets(bitmask), if the caller has it.
    """
    n, k = shape
    if sl.is_whole(shape):
        return bitmask, values
    offsets = row_value_offsets(bitmask) if offsets is None else offsets
    bm = bitmask[sl.row_start:sl.row_end]  # [n, ceil(K/8)]
    vals = values[int(offsets[sl.row_start]):int(offsets[sl.row_end])]  # this rows' non-zeros, row-major
    if (sl.col_start, sl.col_end) == (0, k):
        return bm.contiguous(), vals.contiguous()
    mask = bitmask_to_bool(bm, k)  # [n, K]
    keep = mask[:, sl.col_start:sl.col_end]  # [n, k_loc]
    in_cols = torch.zeros_like(mask)
    in_cols[:, sl.col_start:sl.col_end] = True
    picked = vals[in_cols[mask]]  # mask's True entries in row-major order are exactly vals' order
    return bool_to_bitmask(keep), picked.contiguous()


def slice_dense(weight: torch.Tensor, sl: RankSlice) -> torch.Tensor:
    """W [N, K] (zeros in place) -> W[rows, cols], contiguous."""
    return weight[sl.row_start:sl.row_end, sl.col_start:sl.col_end].contiguous()
