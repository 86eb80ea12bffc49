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


_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)  # set bits per byte


def _byte_popcounts(bitmask: torch.Tensor) -> torch.Tensor:
    """uint8 [N, B] -> uint8 [N, B]: set bits of each byte (a table lookup)."""
    return _POPCOUNT8.to(bitmask.device)[bitmask.to(torch.int32)]


def row_value_offsets(bitmask: torch.Tensor) -> torch.Tensor:
    """int64 [N + 1]: where each row's values start in the row-major values (prefix sum of the
    per-row popcounts), so rows [a, b) own values [off[a], off[b]) and off[N] is the shard's nnz."""
    per_row = _byte_popcounts(bitmask).sum(1, dtype=torch.int64)  # [N]
    return torch.cat([per_row.new_zeros(1), torch.cumsum(per_row, 0)])


def _bits_before(bitmask: torch.Tensor, col: int) -> torch.Tensor:
    """int64 [N]: set bits of each row in columns [0, col)."""
    full, rest = divmod(col, 8)
    before = _byte_popcounts(bitmask[:, :full]).sum(1, dtype=torch.int64)
    if rest:
        before += _byte_popcounts(bitmask[:, full] & ((1 << rest) - 1)).to(torch.int64)
    return before


def _shift_columns(bitmask: torch.Tensor, col_start: int, cols: int) -> torch.Tensor:
    """The bits of columns [col_start, col_start + cols) as a bitmask of its own (column col_start
    becomes bit 0 of byte 0; pad bits clear), byte-wise: col_start need not be a multiple of 8."""
    first, shift = divmod(col_start, 8)
    nbytes = (cols + 7) // 8
    src = bitmask[:, first:first + nbytes + 1].to(torch.int32)  # [n, <= nbytes + 1]
    if src.shape[1] < nbytes + 1:  # past the last byte: zeros
        src = torch.cat([src, src.new_zeros(src.shape[0], nbytes + 1 - src.shape[1])], 1)
    out = ((src[:, :nbytes] >> shift) | (src[:, 1:nbytes + 1] << (8 - shift))) & 0xFF  # [n, nbytes]
    if cols % 8:
        out[:, -1] &= (1 << (cols % 8)) - 1
    return out.to(torch.uint8)


def slice_bitmask(bitmask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], sl: RankSlice,
                  offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard's (bitmask [N, ceil(K/8)], values [nnz]) -> the same encoding of W[rows, cols].

    Values are row-major, so a block of rows owns one contiguous run of values and, within a row,
    a block of columns owns one contiguous run too: both are found from per-byte popcounts
    (O(N * K / 8) byte work, no decode to one entry per weight). Rows only (column-parallel
    layers): the bitmask's rows and a view of the values. Columns (row-parallel layers): the
    bitmask bits shifted to start at col_start (which need not be a multiple of 8) and the values
    gathered row by row. offsets: row_value_offsets(bitmask), if the caller has it.
    """
    n, k = shape
    if sl.is_whole(shape):
        return bitmask, values
    offsets = row_value_offsets(bitmask) if offsets is None else offsets
    bm = bitmask[sl.row_start:sl.row_end]  # [n, ceil(K/8)]
    vals = values[int(offsets[sl.row_start]):int(offsets[sl.row_end])]  # these rows' non-zeros, row-major
    if (sl.col_start, sl.col_end) == (0, k):
        return bm, vals
    row_off = offsets[sl.row_start:sl.row_end] - offsets[sl.row_start]  # [n] first value of each row in vals
    start = row_off + _bits_before(bm, sl.col_start)  # [n]
    length = _bits_before(bm, sl.col_end) - _bits_before(bm, sl.col_start)  # [n]
    # Index of every kept value: row r contributes start[r], start[r] + 1, ..., start[r] + length[r] - 1.
    first_out = torch.cumsum(length, 0) - length  # [n] where row r's values land in the part
    index = torch.repeat_interleave(start - first_out, length) + torch.arange(int(length.sum()), device=vals.device)
    return _shift_columns(bm, sl.col_start, sl.shape[1]), vals[index]


def slice_dense(weight: torch.Tensor, sl: RankSlice) -> torch.Tensor:
    """W [N, K] (zeros in place) -> W[rows, cols], contiguous."""
    return weight[sl.row_start:sl.row_end, sl.col_start:sl.col_end].contiguous()
