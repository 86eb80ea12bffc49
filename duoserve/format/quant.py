"""Quantized values of the bitmask format (format 3, docs/checkpoint-format.md "Quantized values").

For W [N, K] with kept (non-zero) weights, groups of G input columns of a row share one float16
scale s[n, g] (g = k // G). Scheme "symmetric": a kept weight is stored as a code c in [0, 2^b),
standing for (c - 2^(b-1) + 1/2) * s: 2^b levels symmetric about 0 and no zero level, so a
dequantized kept weight is never 0 and "non-zero iff kept" holds for the dequantized matrix as it
does for the float one. Round to nearest (`group_scales`) takes s = (largest kept |w| of the group)
/ (2^(b-1) - 1/2), rounded to float16 and at least 2^-14 (the smallest normal float16); the format
accepts any float16 s > 0 (the joint OBS methods refit s, prune/obs.py). Pruned positions have no code and no part in
the scale.

Codes are laid out like float values: row-major over the kept positions; int4 packs two per byte,
the earlier one in the low nibble (an odd count leaves the last high nibble 0).

The pruning side keeps dequantized weights in the model (the engine rounds them to the model's
dtype). `codes_from_dense` recovers the codes exactly from such a weight and its scales: a level
is at most 2^(b-1) scales from 0, and bf16 rounding moves it by at most 2^(b-1) * 2^-9 <= 1/4 of a
scale, so rounding back is exact (checked, never assumed).
"""
from __future__ import annotations

import torch

from duoserve.errors import CheckpointError
from duoserve.format.schema import WeightQuant

MIN_SCALE = 2.0 ** -14  # smallest normal float16


def half_range(bits: int) -> float:
    """The largest |level| in scales: 7.5 (int4), 127.5 (int8)."""
    return 2.0 ** (bits - 1) - 0.5


def expand_groups(per_group: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[N, ceil(K/G)] -> [N, K]: each group's value repeated over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :k]


def group_scales(weight: torch.Tensor, bits: int, group_size: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Scales of W [N, K]: per row and group of G columns, max |w| over the kept positions (keep
    [N, K] bool; default: w != 0) / half_range, as float16 (>= MIN_SCALE). -> [N, ceil(K/G)] fp16."""
    n, k = weight.shape
    if keep is None:
        keep = weight != 0
    a = (weight.float().abs() * keep).contiguous()  # [N, K]
    pad = (-k) % group_size
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
    amax = a.view(n, -1, group_size).amax(-1)  # [N, ceil(K/G)]
    return (amax / half_range(bits)).to(torch.float16).clamp_min(MIN_SCALE)


def quantize_codes(weight: torch.Tensor, scales_full: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest code of each weight given its scale ([N, K] fp32, expanded) -> int32 [N, K] in [0, 2^b)."""
    top = 2 ** bits - 1
    # nearest level (c - 2^(b-1) + 1/2) s  <=>  c = floor(w / s + 2^(b-1))
    return torch.floor(weight.float() / scales_full + 2 ** (bits - 1)).clamp_(0, top).to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scales_full: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, K] (or [nnz]) and matching scales (fp32) -> fp32 values."""
    return (codes.float() - half_range(bits)) * scales_full


def fake_quantize(weight: torch.Tensor, scales_full: torch.Tensor, bits: int) -> torch.Tensor:
    """The dequantized value of every non-zero weight, 0 where the weight is 0 (fp32 [N, K])."""
    q = dequantize_codes(quantize_codes(weight, scales_full, bits), scales_full, bits)
    return torch.where(weight != 0, q, torch.zeros_like(q))


def round_to_nearest(weight: torch.Tensor, quant: WeightQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN of the kept (non-zero) weights of W [N, K]: (dequantized fp32 [N, K], scales fp16)."""
    scales = group_scales(weight, quant.bits, quant.group_size)
    full = expand_groups(scales.float(), weight.shape[1], quant.group_size)
    return fake_quantize(weight.float(), full, quant.bits), scales


def codes_from_dense(weight: torch.Tensor, scales: torch.Tensor, quant: WeightQuant, name: str = "weight") -> torch.Tensor:
    """The codes of the kept weights of a dequantized W [N, K] (any float dtype), row-major, int32 [nnz].

    Raises CheckpointError if W is not on its scales' grid (dequantizing the codes in W's dtype must
    give W back bit for bit)."""
    n, k = weight.shape
    if tuple(scales.shape) != (n, quant.groups(k)):
        raise CheckpointError(f"{name}: scales of shape {tuple(scales.shape)}, expected {(n, quant.groups(k))}")
    keep = weight != 0
    full = expand_groups(scales.float(), k, quant.group_size)
    codes = torch.round(weight.float() / full + half_range(quant.bits)).clamp_(0, 2 ** quant.bits - 1).to(torch.int32)
    back = dequantize_codes(codes, full, quant.bits).to(weight.dtype)
    bad = keep & (back != weight)
    if bool(bad.any()):
        r, c = (int(i) for i in bad.nonzero()[0])
        raise CheckpointError(f"{name}: weight [{r}, {c}] = {float(weight[r, c])} is not on its {quant.name} grid "
                              f"(scale {float(scales[r, c // quant.group_size])}); quantize before writing")
    return codes[keep]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [nnz] -> uint8 [nnz] (int8) or [ceil(nnz/2)] (int4, low nibble first)."""
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    if c.numel() % 2:
        c = torch.cat([c, c.new_zeros(1)])
    pairs = c.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, nnz: int, bits: int) -> torch.Tensor:
    """uint8 packed codes -> uint8 [nnz]."""
    if bits == 8:
        return packed[:nnz]
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return out[:nnz]


def int4_pad_clear(packed: torch.Tensor, nnz: int, bits: int) -> bool:
    """True unless an int4 tensor with an odd count has a non-zero last high nibble."""
    return bits != 4 or nnz % 2 == 0 or packed.numel() == 0 or int(packed[-1]) >> 4 == 0


def decode_quantized(mask: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, quant: WeightQuant,
                     dtype: torch.dtype) -> torch.Tensor:
    """(mask bool [N, K], packed codes, scales fp16 [N, ceil(K/G)]) -> dense W [N, K] in `dtype`."""
    n, k = mask.shape
    nnz = int(mask.sum())
    codes = unpack_codes(packed, nnz, quant.bits)  # [nnz]
    full = expand_groups(scales.float(), k, quant.group_size)  # [N, K]
    dense = torch.zeros(n, k, dtype=torch.float32, device=packed.device)
    dense[mask] = dequantize_codes(codes, full[mask], quant.bits)
    return dense.to(dtype)
