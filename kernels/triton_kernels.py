"""Triton kernels for the dual-sparse linear on the packed layout (layout.py), GPU (and interpreter).

    y[t, n] = sum_k W[n, k] * where(|x[t, k]| > thr, x[t, k], 0) + bias[n]      (fp32 accumulate)

Layout recap (R = 128 rows per row block): bitmap int32 [NB, K, 4], offsets int32 [NB, K], values
[nnz + R]; element (rb*R + 32w + b, k) is non-zero iff bit b of bitmap[rb, k, w] is set, and then
sits at values[offsets[rb, k] + popc(words before w) + popc(bitmap[rb, k, w] & ((1 << b) - 1))].
A tile of BK columns is decompressed as a [BK, 4, 32] block (word, lane), so every lane finds its
value with one masked popcount and one load; absent weights are masked loads (no bytes read).

Decode (T <= DECODE_MAX_TOKENS), no host sync, fixed shapes (CUDA-graph safe), two variants
(the tuner times both per shape):
  compact: 1. _compact_kernel, one program per CHUNK = 256 input columns: the columns active for
     at least one token are listed chunk-locally (cumsum of the any-token mask), with the tokens'
     masked inputs in fp32 (exact per-token masking), and count[chunk]; it zeroes the output too.
     2. _decode_kernel, grid (row blocks, tiles of BK list slots): a tile past its chunk's count
     does nothing, so an inactive column costs neither ALU work nor weight bytes.
  raw: _decode_kernel on tiles of BK raw columns, inactive ones masked (no bytes, idle lanes).
  Both: one tile per program (split-K to the limit) so that many independent load chains are in
  flight; fp32 atomics combine the tiles; _finalize_kernel adds the bias and casts.
  loop (_decode_loop_kernel, the first version, the only one measured on a GPU so far): compact
     lists, each program loops over CPS chunks; the fallback when nothing has been tuned.
Prefill / larger T: _gemm_kernel decompresses [BK, 128] tiles on the fly into registers and runs
tl.dot (tensor cores for fp16/bf16; IEEE fp32 for fp32) with fp32 accumulation; no dense copy of
the weight exists. For few token blocks it also splits K (atomics) to fill the GPU.
Under TRITON_INTERPRET=1 popcounts use a SWAR sequence (libdevice is not interpreted) and
autotuning is off.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # older Triton layouts
    from triton.language.extra.cuda import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HW_POPC = not INTERPRET
R = 128  # rows per row block (layout.BLOCK_ROWS)
CHUNK = 256  # input columns per compaction chunk


@triton.jit
def _popc(v, HW: tl.constexpr):
    """Bit count of int32 words (returns int32)."""
    if HW:
        return libdevice.popc(v)
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _load_tile(bitmap_ptr, offsets_ptr, values_ptr, rb, K, cols, col_ok, HW: tl.constexpr):
    """Columns `cols` [BK] of row block rb -> weights [BK, 4, 32] in the values' dtype (0 where absent).

    Per column (amortized over its 128 rows): 4 words, their popcounts and prefix; per element:
    one bit test, one masked popcount and one masked load."""
    col = rb * K + cols  # [BK] (rb, k) index
    word_i = tl.arange(0, 4)
    lane = tl.arange(0, 32)
    start = tl.load(offsets_ptr + col, mask=col_ok, other=0)  # [BK]
    words = tl.load(bitmap_ptr + col[:, None] * 4 + word_i[None, :], mask=col_ok[:, None], other=0)
    counts = _popc(words, HW)  # [BK, 4]
    before = (tl.cumsum(counts, axis=1) - counts)[:, :, None]  # [BK, 4, 1] values before word w
    w3 = words[:, :, None]  # [BK, 4, 1]
    present = ((w3 >> lane[None, None, :]) & 1) != 0  # [BK, 4, 32]
    below = w3 & ((1 << lane[None, None, :]) - 1)  # set bits of lower lanes
    idx = start[:, None, None] + before + _popc(below, HW)  # [BK, 4, 32]
    return tl.load(values_ptr + idx, mask=present, other=0.0)


@triton.jit
def _compact_kernel(x_ptr, thr_ptr, idx_ptr, xc_ptr, count_ptr, out_ptr, T, K, OUT_NUMEL,
                    BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, ZERO_BLOCK: tl.constexpr):
    """Per chunk of CHUNK columns: active column list idx [K], masked inputs xc [T, K] fp32
    (both chunk-local, in column order), count [num_chunks]; zeroes a slice of out [T, N] fp32."""
    c = tl.program_id(0)
    thr = tl.load(thr_ptr)
    k = c * CHUNK + tl.arange(0, CHUNK)  # [CHUNK]
    b = tl.arange(0, BLOCK_B)
    ok = (b[:, None] < T) & (k[None, :] < K)  # [BLOCK_B, CHUNK]
    x = tl.load(x_ptr + b[:, None] * K + k[None, :], mask=ok, other=0.0).to(tl.float32)
    keep = (tl.abs(x) > thr) & ok  # NaN compares False: a NaN input is dropped
    active = tl.max(keep.to(tl.int32), axis=0)  # [CHUNK] any token
    pos = tl.cumsum(active, axis=0) - 1  # slot of each active column
    dst = c * CHUNK + pos
    is_active = active != 0
    tl.store(idx_ptr + dst, k, mask=is_active)
    tl.store(xc_ptr + b[:, None] * K + dst[None, :], tl.where(keep, x, 0.0),
             mask=is_active[None, :] & (b[:, None] < T))
    tl.store(count_ptr + c, tl.sum(active, axis=0))
    z = c * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
    step = tl.num_programs(0) * ZERO_BLOCK
    for start in range(0, OUT_NUMEL, step):
        tl.store(out_ptr + start + z, tl.zeros([ZERO_BLOCK], tl.float32), mask=start + z < OUT_NUMEL)


@triton.jit
def _decode_kernel(idx_ptr, xc_ptr, count_ptr, x_ptr, thr_ptr, bitmap_ptr, offsets_ptr, values_ptr,
                   out_ptr, T, N, K,
                   BLOCK_B: tl.constexpr, BK: tl.constexpr, COMPACT: tl.constexpr,
                   CHUNK: tl.constexpr, HW: tl.constexpr):
    """out[t, rb*128 + r] += the contribution of one tile of BK input columns (one per program).

    One tile per program (no loop): a tile's loads form one dependent chain (list -> bitmap ->
    values) whose latency the GPU hides across many resident programs; a loop would serialize it.
    COMPACT: program (rb, q) takes slots [sub*BK, sub*BK + BK) of chunk q // (CHUNK/BK)'s active list
      and does nothing when the list is shorter (inactive columns cost no ALU work, no bytes).
    not COMPACT: program (rb, q) takes raw columns [q*BK, q*BK + BK) and masks the inactive ones
      (no bytes read for them, but their lanes idle): no compaction launch."""
    rb = tl.program_id(0)
    q = tl.program_id(1)
    b = tl.arange(0, BLOCK_B)
    jj = tl.arange(0, BK)
    if COMPACT:
        c = q // (CHUNK // BK)
        j0 = (q % (CHUNK // BK)) * BK
        cnt = tl.load(count_ptr + c)
        run = j0 < cnt
    else:
        run = q * BK < K
    if run:
        if COMPACT:
            ok = j0 + jj < cnt
            slot = c * CHUNK + j0 + jj  # [BK] slots in the chunk's list
            cols = tl.load(idx_ptr + slot, mask=ok, other=0)  # [BK]
            xv = tl.load(xc_ptr + b[:, None] * K + slot[None, :],
                         mask=(b[:, None] < T) & ok[None, :], other=0.0)  # [BLOCK_B, BK] masked
        else:
            cols = q * BK + jj  # [BK]
            inside = (b[:, None] < T) & (cols[None, :] < K)
            xv = tl.load(x_ptr + b[:, None] * K + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            xv = tl.where(tl.abs(xv) > tl.load(thr_ptr), xv, 0.0)  # [BLOCK_B, BK]
            ok = tl.max((xv != 0.0).to(tl.int32), axis=0) != 0  # [BK] column needed by some token
        w = _load_tile(bitmap_ptr, offsets_ptr, values_ptr, rb, K, cols, ok, HW).to(tl.float32)
        acc = tl.sum(w[None, :, :, :] * xv[:, :, None, None], axis=1)  # [BLOCK_B, 4, 32]
        rows = rb * 128 + tl.arange(0, 4)[:, None] * 32 + tl.arange(0, 32)[None, :]  # [4, 32]
        ptrs = out_ptr + b[:, None, None] * N + rows[None, :, :]
        tl.atomic_add(ptrs, acc, mask=(b[:, None, None] < T) & (rows[None, :, :] < N))


@triton.jit
def _decode_loop_kernel(idx_ptr, xc_ptr, count_ptr, bitmap_ptr, offsets_ptr, values_ptr, out_ptr,
                        T, N, K, NUM_CHUNKS,
                        BLOCK_B: tl.constexpr, BK: tl.constexpr, CPS: tl.constexpr,
                        CHUNK: tl.constexpr, HW: tl.constexpr):
    """The first decode kernel (the one measured on the H200, docs/kernels.md): program (rb, s)
    loops over the compacted lists of chunks [s*CPS, (s+1)*CPS) in steps of BK slots.
    out[t, rb*128 + r] += its partial sum."""
    rb = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.arange(0, BLOCK_B)
    acc = tl.zeros([BLOCK_B, 4, 32], tl.float32)
    for ci in range(0, CPS):
        c = s * CPS + ci
        cnt = tl.load(count_ptr + c, mask=c < NUM_CHUNKS, other=0)
        for j0 in range(0, cnt, BK):
            jj = j0 + tl.arange(0, BK)  # [BK] slots in the chunk's list
            ok = jj < cnt
            slot = c * CHUNK + jj
            cols = tl.load(idx_ptr + slot, mask=ok, other=0)  # [BK]
            w = _load_tile(bitmap_ptr, offsets_ptr, values_ptr, rb, K, cols, ok, HW).to(tl.float32)
            xv = tl.load(xc_ptr + b[:, None] * K + slot[None, :],
                         mask=(b[:, None] < T) & ok[None, :], other=0.0)  # [BLOCK_B, BK]
            acc += tl.sum(w[None, :, :, :] * xv[:, :, None, None], axis=1)
    rows = rb * 128 + tl.arange(0, 4)[:, None] * 32 + tl.arange(0, 32)[None, :]  # [4, 32]
    ptrs = out_ptr + b[:, None, None] * N + rows[None, :, :]
    tl.atomic_add(ptrs, acc, mask=(b[:, None, None] < T) & (rows[None, :, :] < N))


@triton.jit
def _finalize_kernel(acc_ptr, bias_ptr, y_ptr, N, NUMEL, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = (acc + bias) in y's dtype; acc, y [T, N]."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < NUMEL
    v = tl.load(acc_ptr + i, mask=ok, other=0.0)
    if HAS_BIAS:
        v += tl.load(bias_ptr + i % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, v.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemm_kernel(x_ptr, thr_ptr, bitmap_ptr, offsets_ptr, values_ptr, bias_ptr, y_ptr,
                 T, N, K, K_PER_SPLIT,
                 BT: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                 DOT_F32: tl.constexpr, HW: tl.constexpr):
    """y[tb*BT:, rb*128:] (+)= xm[tile] @ W^T[tile]: decompressed [BK, 128] tiles + tl.dot.

    ATOMIC: K is split over program_id(2) and partial sums go to an fp32 y with atomics
    (bias then comes in the finalize kernel); otherwise y is x's dtype and written directly.
    DOT_F32: IEEE fp32 products (fp32 inputs; also 16-bit inputs under the interpreter, whose
    16-bit tl.dot is wrong); otherwise 16-bit tensor-core products."""
    tb = tl.program_id(0)
    rb = tl.program_id(1)
    ks = tl.program_id(2)
    thr = tl.load(thr_ptr)
    t = tb * BT + tl.arange(0, BT)
    acc = tl.zeros([BT, 128], tl.float32)
    k_begin = ks * K_PER_SPLIT
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BK):
        cols = k0 + tl.arange(0, BK)
        col_ok = cols < K
        w = _load_tile(bitmap_ptr, offsets_ptr, values_ptr, rb, K, cols, col_ok, HW)  # [BK, 4, 32]
        w = tl.reshape(w, [BK, 128])  # rows in order: word * 32 + lane
        x = tl.load(x_ptr + t[:, None] * K + cols[None, :], mask=(t[:, None] < T) & col_ok[None, :],
                    other=0.0)  # [BT, BK]
        x = tl.where(tl.abs(x.to(tl.float32)) > thr, x, tl.zeros_like(x))
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    rows = rb * 128 + tl.arange(0, 128)
    ok = (t[:, None] < T) & (rows[None, :] < N)
    ptrs = y_ptr + t[:, None] * N + rows[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)
