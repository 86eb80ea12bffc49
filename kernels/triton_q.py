"""Triton GEMM for duoserve::dual_sparse_linear_q (int4/int8 codes, qlayout.py) on CUDA.

    y[tb*BT:, rb*128:] = xm[tokens, :] @ Wq^T[:, rows]      (fp32 products and sums)

One program per (token block, row block) loops over the input columns in tiles of BK: the tile's
bitmap words and offsets are read as in the float GEMM (triton_kernels.py), each present weight's
code is loaded at its rank (int8: one byte; int4: the byte holding it, shifted), turned into its
level and multiplied by its row's scale (scales [NB, NG, 128] fp16, one group per column) in
registers, and the [BK, 128] tile goes to tl.dot with the masked inputs. No dequantized weight is
written to memory. Any token count (decode and prefill); not timed against the float kernels and
never run on a GPU here (no GPU was lent): correct under TRITON_INTERPRET=1
(tests/kernels/triton_q_interpret_cases.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_kernels import HW_POPC, INTERPRET, _popc, _tile_index


@triton.jit
def _tile_codes(codes_ptr, scales_ptr, start, words, rb, NG, cols, col_ok, G,
                BITS: tl.constexpr, HW: tl.constexpr):
    """Weights [BK, 4, 32] fp32 (0 where absent) from the codes and scales of a column tile."""
    bit = (1 << tl.arange(0, 32))[None, None, :]  # [1, 1, 32]
    counts = _popc(words, HW)  # [BK, 4]
    base = (start[:, None] + tl.cumsum(counts, axis=1) - counts)[:, :, None]  # [BK, 4, 1]
    w3 = words[:, :, None]
    present = (w3 & bit) != 0  # [BK, 4, 32]
    idx = base + _popc(w3 & (bit - 1), HW)  # [BK, 4, 32] this weight's code index (in bounds: padding)
    if BITS == 8:
        code = tl.load(codes_ptr + idx).to(tl.float32)
    else:
        byte = tl.load(codes_ptr + (idx >> 1)).to(tl.int32)
        code = ((byte >> ((idx & 1) * 4)) & 0xF).to(tl.float32)
    rows = tl.arange(0, 4)[:, None] * 32 + tl.arange(0, 32)[None, :]  # [4, 32]
    group = cols // G  # [BK]
    scale = tl.load(scales_ptr + ((rb * NG + group) * 128)[:, None, None] + rows[None, :, :],
                    mask=col_ok[:, None, None], other=0.0).to(tl.float32)  # [BK, 4, 32]
    half = (1 << (BITS - 1)) - 0.5
    return tl.where(present, (code - half) * scale, 0.0)


@triton.jit
def _gemm_q_kernel(x_ptr, thr_ptr, bitmap_ptr, offsets_ptr, codes_ptr, scales_ptr, bias_ptr, y_ptr,
                   T, N, K, NG, G, BT: tl.constexpr, BK: tl.constexpr, BITS: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HW: tl.constexpr):
    tb = tl.program_id(0)
    rb = tl.program_id(1)
    thr = tl.load(thr_ptr)
    t = tb * BT + tl.arange(0, BT)
    acc = tl.zeros([BT, 128], tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        col_ok = cols < K
        start, words = _tile_index(bitmap_ptr, offsets_ptr, rb, K, cols, col_ok)
        w = tl.reshape(_tile_codes(codes_ptr, scales_ptr, start, words, rb, NG, cols, col_ok, G, BITS, HW),
                       [BK, 128])  # rows in order: word * 32 + lane
        x = tl.load(x_ptr + t[:, None] * K + cols[None, :], mask=(t[:, None] < T) & col_ok[None, :],
                    other=0.0).to(tl.float32)  # [BT, BK]
        x = tl.where(tl.abs(x) > thr, x, 0.0)
        acc += tl.dot(x, w, input_precision="ieee")
    rows = rb * 128 + tl.arange(0, 128)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
    ok = (t[:, None] < T) & (rows[None, :] < N)
    tl.store(y_ptr + t[:, None] * N + rows[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)


def linear_q(x, bitmap, offsets, codes, scales, threshold, bias, n, k, bits, group_size, BK: int = 32):
    """x [T, K] on the kernel's device -> y [T, N] in x.dtype."""
    x = x.contiguous()
    t_tokens = x.shape[0]
    y = torch.empty(t_tokens, n, dtype=x.dtype, device=x.device)
    if t_tokens == 0 or n == 0:
        return y
    bt = 16 if t_tokens <= 16 else 32
    nb = -(-n // 128)
    ng = -(-k // group_size)
    _gemm_q_kernel[(triton.cdiv(t_tokens, bt), nb)](
        x, threshold, bitmap, offsets, codes, scales, bias if bias is not None else y, y, t_tokens, n, k, ng,
        group_size, BT=bt, BK=BK, BITS=bits, HAS_BIAS=bias is not None, HW=HW_POPC, num_warps=4)
    return y


__all__ = ["linear_q", "INTERPRET"]
