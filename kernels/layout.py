"""The packed dual-sparse weight layout ("column-block bitmap") and its packing.

Why this layout: at decode the op is memory-bound, and only an input-channel-major (column-major)
compressed layout profits from weight sparsity (fewer bytes per column) *and* activation sparsity
(a column whose input is masked is not read at all). See docs/kernels.md.

Layout of W [N, K] (out, in), with R = BLOCK_ROWS = 128 rows per row block, NB = ceil(N / R):

    bitmap   int32 [NB, K, R/32]  bit b of word w of (rb, k) is 1 iff W[rb*R + 32*w + b, k] != 0
    offsets  int32 [NB, K]        index into `values` of the first non-zero of (rb, k)
    values   dtype [nnz + R]      non-zeros ordered by (rb, k, row); R trailing zeros of padding so
                                  that a vector kernel may load a full block past the last one

The non-zeros of column k inside row block rb are values[offsets[rb, k] : offsets[rb, k] +
popcount(bitmap[rb, k, :])], in increasing row order; the row of the j-th one is the position of
the j-th set bit. Rows >= N of the last block have zero bits.

Bytes per element for 16-bit values at weight sparsity p_w:
    2 (1 - p_w) + R/8 / R + 4 / R = 2 (1 - p_w) + 0.125 + 0.031
so 1.156 at p_w = 0.5 against the bitmap bound of 1.125 and 2.0 dense.

Packing is vectorized torch and runs on the weight's device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_ROWS = 128  # R: rows per row block; a multiple of 32 (one int32 word per 32 rows)
WORDS = BLOCK_ROWS // 32
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class PackedWeight:
    """The runtime dual-sparse weight: three tensors and two ints.

    Store it in a module as plain attributes: `tensors()` gives the tensors (register them as
    buffers or parameters), `n` and `k` are ints, and `PackedWeight.from_tensors(d, n, k)` rebuilds
    it. `nnz` is derived from `values`.
    """

    n: int
    k: int
    bitmap: torch.Tensor  # [NB, K, R/32] int32
    offsets: torch.Tensor  # [NB, K] int32
    values: torch.Tensor  # [nnz + R] fp16 / bf16 / fp32

    def __post_init__(self):
        nb = (self.n + BLOCK_ROWS - 1) // BLOCK_ROWS
        if tuple(self.bitmap.shape) != (nb, self.k, WORDS) or self.bitmap.dtype != torch.int32:
            raise ValueError(f"bitmap must be int32 [{nb}, {self.k}, {WORDS}], got "
                             f"{self.bitmap.dtype} {tuple(self.bitmap.shape)}")
        if tuple(self.offsets.shape) != (nb, self.k) or self.offsets.dtype != torch.int32:
            raise ValueError(f"offsets must be int32 [{nb}, {self.k}], got "
                             f"{self.offsets.dtype} {tuple(self.offsets.shape)}")
        if self.values.dim() != 1 or self.values.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"values must be 1-D fp16/bf16/fp32, got {self.values.dtype} "
                             f"{tuple(self.values.shape)}")
        if self.values.numel() < BLOCK_ROWS:
            raise ValueError("values must carry BLOCK_ROWS elements of trailing padding")

    @property
    def block_rows(self) -> int:
        return BLOCK_ROWS

    @property
    def num_blocks(self) -> int:
        return self.bitmap.shape[0]

    @property
    def nnz(self) -> int:
        return self.values.numel() - BLOCK_ROWS

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bitmap": self.bitmap, "offsets": self.offsets, "values": self.values}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], n: int, k: int, check: bool = False) -> "PackedWeight":
        """Rebuild from `tensors()`. Cheap (shapes only), so a module may rebuild it per forward
        from its own buffers, also under torch.compile. check=True checks the index in full
        (`check_index`): do that for tensors this process did not pack (a file, another process),
        since the kernels trust the index for every address they read."""
        packed = cls(n=int(n), k=int(k), bitmap=tensors["bitmap"], offsets=tensors["offsets"],
                     values=tensors["values"])
        if check:
            packed.check_index()
        return packed

    def check_index(self) -> None:
        """Raise ValueError unless the offsets are the exclusive prefix sum of the bitmap's column
        counts, no bit is set for a row past N, and `values` holds every non-zero plus the padding:
        then no kernel reads or writes out of bounds. O(NB * K), once per weight."""
        counts = _popcount32(self.bitmap).sum(-1, dtype=torch.int64).flatten()  # [NB * K]
        starts = torch.cumsum(counts, 0) - counts
        if not torch.equal(self.offsets.flatten().to(torch.int64), starts):
            raise ValueError("packed weight: offsets are not the prefix sum of the bitmap's column counts "
                             "(rebuild it with pack_dense / pack_bitmask)")
        nnz = int(counts.sum())
        if self.values.numel() != nnz + BLOCK_ROWS:
            raise ValueError(f"packed weight: the bitmap has {nnz} non-zeros, so values must have "
                             f"{nnz + BLOCK_ROWS} elements (with padding), got {self.values.numel()}")
        tail = self.n - (self.num_blocks - 1) * BLOCK_ROWS  # rows of the last block
        if self.num_blocks and self.k and tail < BLOCK_ROWS:
            rows = torch.arange(BLOCK_ROWS, device=self.bitmap.device).view(WORDS, 32)
            pad = ((self.bitmap[-1].unsqueeze(-1) >> torch.arange(32, device=self.bitmap.device)) & 1).bool()
            if bool((pad & (rows >= tail)).any()):
                raise ValueError(f"packed weight: bits are set for rows past N = {self.n} in the last row block")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bytes_per_element(self) -> float:
        return self.nbytes() / (self.n * self.k)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "PackedWeight":
        """Move to a device and/or cast the values (the index tensors keep int32)."""
        return PackedWeight(self.n, self.k, self.bitmap.to(device), self.offsets.to(device),
                            self.values.to(device=device, dtype=dtype))


def pack_dense(weight: torch.Tensor) -> PackedWeight:
    """W [N, K] with zeros where pruned (fp16 / bf16 / fp32) -> PackedWeight on W's device."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got {tuple(weight.shape)}")
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"unsupported weight dtype {weight.dtype}")
    n, k = weight.shape
    nb = (n + BLOCK_ROWS - 1) // BLOCK_ROWS
    padded = torch.zeros(nb * BLOCK_ROWS, k, dtype=weight.dtype, device=weight.device)
    padded[:n] = weight
    cols = padded.view(nb, BLOCK_ROWS, k).transpose(1, 2)  # [NB, K, R]: (rb, k, row) order
    nonzero = cols != 0  # [NB, K, R] bool
    values = cols[nonzero]  # [nnz], boolean indexing walks (rb, k, row) in order
    values = torch.cat([values, values.new_zeros(BLOCK_ROWS)])  # [nnz + R] padding for vector loads

    bit_weights = torch.ones(32, dtype=torch.int64, device=weight.device) << torch.arange(
        32, device=weight.device)  # [32] int64
    words = (nonzero.view(nb, k, WORDS, 32).to(torch.int64) * bit_weights).sum(-1)  # [NB, K, W]
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement

    counts = nonzero.sum(-1, dtype=torch.int64).flatten()  # [NB * K]
    starts = torch.cumsum(counts, 0) - counts  # exclusive prefix sum
    if counts.sum() >= 2**31:
        raise ValueError("more than 2^31 non-zeros do not fit the int32 offsets")
    offsets = starts.to(torch.int32).view(nb, k)
    return PackedWeight(n=n, k=k, bitmap=words.contiguous(), offsets=offsets.contiguous(),
                        values=values.contiguous())


def _popcount32(words: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> int64 [...] set bits of each word (as unsigned)."""
    v = words.to(torch.int64) & 0xFFFFFFFF  # SWAR popcount: a few int64 temporaries, not one per bit
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    return (((v + (v >> 4)) & 0x0F0F0F0F) * 0x01010101 >> 24) & 0xFF


def _bitmask_to_bool(bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/8)] (bit k % 8 of byte k // 8, LSB first) -> bool [N, K]."""
    shifts = torch.arange(8, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # [N, K8, 8]
    return bits.view(bitmask.shape[0], -1)[:, :k].bool()


def pack_bitmask(bitmask: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> PackedWeight:
    """The checkpoint's on-disk encoding -> PackedWeight (docs/checkpoint-format.md).

    bitmask: uint8 [N, ceil(K/8)], bit k % 8 (LSB first) of byte k // 8 of row n set iff W[n, k]
    != 0; values: [nnz] non-zeros in row-major order; shape: (N, K). Runs on bitmask's device.
    """
    n, k = int(shape[0]), int(shape[1])
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (n, (k + 7) // 8):
        raise ValueError(f"bitmask must be uint8 [{n}, {(k + 7) // 8}], got {bitmask.dtype} "
                         f"{tuple(bitmask.shape)}")
    mask = _bitmask_to_bool(bitmask, k)  # [N, K]
    count = int(mask.sum())
    if values.dim() != 1 or values.numel() != count:
        raise ValueError(f"values has {values.numel()} elements, the bitmask has {count} set bits")
    dense = torch.zeros(n, k, dtype=values.dtype, device=bitmask.device)
    dense[mask] = values.to(bitmask.device)
    return pack_dense(dense)


def unpack_dense(packed: PackedWeight, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
    """PackedWeight -> dense W[row_start:row_end] [rows, K] in the values' dtype (pure torch).

    row_start must be a multiple of BLOCK_ROWS; used by the reference path and by tests.
    """
    row_end = packed.n if row_end is None else row_end
    if row_start % BLOCK_ROWS:
        raise ValueError("row_start must be a multiple of BLOCK_ROWS")
    rb0, rb1 = row_start // BLOCK_ROWS, (row_end + BLOCK_ROWS - 1) // BLOCK_ROWS
    words = packed.bitmap[rb0:rb1]  # [nb, K, W] int32
    nb = words.shape[0]
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).bool().view(nb, packed.k, BLOCK_ROWS)  # [nb, K, R]
    start = int(packed.offsets[rb0, 0]) if nb and packed.k else 0
    count = int(bits.sum())
    cols = torch.zeros(nb, packed.k, BLOCK_ROWS, dtype=packed.dtype, device=words.device)
    cols[bits] = packed.values[start:start + count]
    dense = cols.transpose(1, 2).reshape(nb * BLOCK_ROWS, packed.k)  # [nb * R, K]
    return dense[: row_end - row_start]
