"""The quantized dual-sparse layout: the column-block bitmap of layout.py with int4/int8 codes.

Weights W [N, K] stored as codes (docs/checkpoint-format.md, format 3): a kept weight of row n,
input column k is (c - 2^(b-1) + 1/2) * scale[n, k // G], c the b-bit code (b = 4 or 8), scale a
float16 per row and group of G input columns. Runtime layout (R = BLOCK_ROWS = 128 rows per row
block, NB = ceil(N / R), NG = ceil(K / G)):

    bitmap   int32 [NB, K, R/32]   as layout.py: bit b of word w of (rb, k) is W[rb*R + 32w + b, k] != 0
    offsets  int32 [NB, K]         index (in codes, not bytes) of the first code of (rb, k)
    codes    uint8 [nnz + R] (int8) or [(nnz + R + 1) / 2] (int4: code j in byte j / 2, low nibble
                                   first), in (rb, k, row) order as layout.py's values, R codes of padding
    scales   fp16  [NB, NG, R]     scale of row rb*R + r for group g at [rb, g, r] (rows past N: 1)

so a walk over row block rb reads, per active column, its bitmap words, its codes and (once per
group) 256 contiguous bytes of scales. Bytes per weight at weight sparsity p_w:
    (1 - p_w) * b/8 + 1/8 (bitmap) + 4/R (offsets) + 2/G (scales)
int4, p_w = 0.5, G = 128: 0.25 + 0.125 + 0.031 + 0.016 = 0.422; int8: 0.672 (dense int4 with
fp16 group-128 scales: 0.516).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import BLOCK_ROWS, WORDS, _bitmask_to_bool, _popcount32, pack_dense

QUANT_BITS = (4, 8)


def half_range(bits: int) -> float:
    return 2.0 ** (bits - 1) - 0.5


@dataclass
class QPackedWeight:
    """The runtime quantized dual-sparse weight: four tensors and four ints (n, k, bits, group_size)."""

    n: int
    k: int
    bits: int
    group_size: int
    bitmap: torch.Tensor  # [NB, K, R/32] int32
    offsets: torch.Tensor  # [NB, K] int32
    codes: torch.Tensor  # uint8, see the module docstring
    scales: torch.Tensor  # [NB, NG, R] fp16

    def __post_init__(self):
        nb = -(-self.n // BLOCK_ROWS)
        ng = -(-self.k // self.group_size) if self.group_size > 0 else 0
        if self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if tuple(self.bitmap.shape) != (nb, self.k, WORDS) or self.bitmap.dtype != torch.int32:
            raise ValueError(f"bitmap must be int32 [{nb}, {self.k}, {WORDS}], got {self.bitmap.dtype} "
                             f"{tuple(self.bitmap.shape)}")
        if tuple(self.offsets.shape) != (nb, self.k) or self.offsets.dtype != torch.int32:
            raise ValueError(f"offsets must be int32 [{nb}, {self.k}]")
        if self.codes.dim() != 1 or self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be 1-D uint8, got {self.codes.dtype} {tuple(self.codes.shape)}")
        if tuple(self.scales.shape) != (nb, ng, BLOCK_ROWS) or self.scales.dtype != torch.float16:
            raise ValueError(f"scales must be float16 [{nb}, {ng}, {BLOCK_ROWS}], got {self.scales.dtype} "
                             f"{tuple(self.scales.shape)}")

    @property
    def nnz(self) -> int:
        """Kept weights (from the bitmap: an int4 byte count cannot tell an odd count)."""
        return int(_popcount32(self.bitmap).sum())

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bitmap": self.bitmap, "offsets": self.offsets, "codes": self.codes, "scales": self.scales}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], n: int, k: int, bits: int, group_size: int) -> "QPackedWeight":
        return cls(int(n), int(k), int(bits), int(group_size), t["bitmap"], t["offsets"], t["codes"], t["scales"])

    def check_index(self) -> None:
        """ValueError unless the offsets are the prefix sum of the column counts and codes hold
        every code plus the padding (the kernels trust the index for every address they read)."""
        counts = _popcount32(self.bitmap).sum(-1, dtype=torch.int64).flatten()
        starts = torch.cumsum(counts, 0) - counts
        if not torch.equal(self.offsets.flatten().to(torch.int64), starts):
            raise ValueError("quantized packed weight: offsets are not the prefix sum of the bitmap's counts")
        nnz = int(counts.sum())
        if self.codes.numel() != code_bytes(nnz + BLOCK_ROWS, self.bits):
            raise ValueError(f"quantized packed weight: {nnz} non-zeros need {code_bytes(nnz + BLOCK_ROWS, self.bits)} "
                             f"code bytes with padding, got {self.codes.numel()}")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bytes_per_element(self) -> float:
        return self.nbytes() / (self.n * self.k)

    def to(self, device=None) -> "QPackedWeight":
        return QPackedWeight(self.n, self.k, self.bits, self.group_size,
                             *(t.to(device) for t in (self.bitmap, self.offsets, self.codes, self.scales)))


def code_bytes(count: int, bits: int) -> int:
    return count if bits == 8 else (count + 1) // 2


def _pack_nibbles(c: torch.Tensor) -> torch.Tensor:
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    pairs = c.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def _unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count]


def pack_quantized_dense(codes: torch.Tensor, mask: torch.Tensor, scales: torch.Tensor, bits: int,
                         group_size: int) -> QPackedWeight:
    """codes [N, K] (any int dtype; used where mask), mask bool [N, K] (True = kept), scales
    [N, ceil(K/G)] fp16 -> QPackedWeight on the codes' device."""
    n, k = mask.shape
    if tuple(codes.shape) != (n, k):
        raise ValueError(f"codes {tuple(codes.shape)} and mask {(n, k)} differ")
    ng = -(-k // group_size)
    if tuple(scales.shape) != (n, ng):
        raise ValueError(f"scales must be [{n}, {ng}], got {tuple(scales.shape)}")
    if bool(mask.any()) and (int(codes[mask].min()) < 0 or int(codes[mask].max()) >= 2 ** bits):
        raise ValueError(f"codes outside [0, {2 ** bits})")
    index = pack_dense(mask.to(torch.float32))  # bitmap and offsets of the mask
    nb = index.num_blocks
    padded = torch.zeros(nb * BLOCK_ROWS, k, dtype=torch.uint8, device=mask.device)
    padded[:n] = codes.to(torch.uint8)
    pmask = torch.zeros(nb * BLOCK_ROWS, k, dtype=torch.bool, device=mask.device)
    pmask[:n] = mask
    ordered = padded.view(nb, BLOCK_ROWS, k).transpose(1, 2)[pmask.view(nb, BLOCK_ROWS, k).transpose(1, 2)]
    ordered = torch.cat([ordered, ordered.new_zeros(BLOCK_ROWS)])  # [nnz + R] in (rb, k, row) order
    packed_codes = ordered.contiguous() if bits == 8 else _pack_nibbles(ordered)
    s = torch.ones(nb * BLOCK_ROWS, ng, dtype=torch.float16, device=mask.device)
    s[:n] = scales.to(torch.float16)
    s = s.view(nb, BLOCK_ROWS, ng).transpose(1, 2).contiguous()  # [NB, NG, R]
    return QPackedWeight(n, k, bits, group_size, index.bitmap, index.offsets, packed_codes, s)


def pack_quantized(bitmask: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int],
                   bits: int, group_size: int) -> QPackedWeight:
    """The checkpoint's encoding -> QPackedWeight: bitmask uint8 [N, ceil(K/8)], codes uint8 [nnz]
    (one code per element, row-major over the kept positions: int4 already unpacked), scales fp16
    [N, ceil(K/G)]."""
    n, k = int(shape[0]), int(shape[1])
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (n, (k + 7) // 8):
        raise ValueError(f"bitmask must be uint8 [{n}, {(k + 7) // 8}], got {bitmask.dtype} {tuple(bitmask.shape)}")
    mask = _bitmask_to_bool(bitmask, k)
    if codes.dim() != 1 or codes.numel() != int(mask.sum()):
        raise ValueError(f"codes has {codes.numel()} elements, the bitmask has {int(mask.sum())} set bits")
    dense = torch.zeros(n, k, dtype=torch.uint8, device=bitmask.device)
    dense[mask] = codes.to(device=bitmask.device, dtype=torch.uint8)
    return pack_quantized_dense(dense, mask, scales.to(bitmask.device), bits, group_size)


def unpack_dequantized(q: QPackedWeight) -> torch.Tensor:
    """QPackedWeight -> the dense dequantized W [N, K] in fp32 (zeros where pruned; pure torch)."""
    nb, k = q.bitmap.shape[0], q.k
    shifts = torch.arange(32, dtype=torch.int32, device=q.device)
    bits = ((q.bitmap.unsqueeze(-1) >> shifts) & 1).bool().view(nb, k, BLOCK_ROWS)  # [NB, K, R]
    count = int(bits.sum())
    codes = q.codes[:count] if q.bits == 8 else _unpack_nibbles(q.codes, count)
    full_scales = q.scales.float().repeat_interleave(q.group_size, dim=1)[:, :k]  # [NB, K, R]
    cols = torch.zeros(nb, k, BLOCK_ROWS, dtype=torch.float32, device=q.device)
    cols[bits] = (codes.float() - half_range(q.bits)) * full_scales[bits]
    return cols.transpose(1, 2).reshape(nb * BLOCK_ROWS, k)[: q.n]
