"""Triton kernels for the dual-sparse linear on the packed layout (layout.py), GPU (and interpreter).

    y[t, n] = sum_k W[n, k] * where(|x[t, k]| > thr, x[t, k], 0) + bias[n]      (fp32 accumulate)

Layout recap (R = 128 rows per row block): bitmap int32 [NB, K, 4], offsets int32 [NB, K], values
[nnz + R]; element (rb*R + 32w + b, k) is non-zero iff bit b of bitmap[rb, k, w] is set, and then
sits at values[offsets[rb, k] + popc(words before w) + popc(bitmap[rb, k, w] & ((1 << b) - 1))].
A tile of BK columns is decompressed as a [BK, 4, 32] block (word, lane), so every lane finds its
value with one masked popcount and one load (unmasked: an absent weight loads its neighbour, in
bounds thanks to the padding, and a select zeroes it; see _tile_values).

Decode (T <= DECODE_MAX_TOKENS), no host sync, fixed shapes (CUDA-graph safe); the tuner times
the variants per shape (gpu._decode_configs):
  compact: 1. _compact_kernel, one program per CHUNK = 256 input columns: the columns active for
     at least one token are listed chunk-locally (cumsum of the any-token mask), with the tokens'
     masked inputs in fp32 (exact per-token masking), and count[chunk]; it zeroes the output too.
     2. _decode_kernel, grid (row blocks, tiles of BK list slots): a tile past its chunk's count
     does nothing, so an inactive column costs neither ALU work nor weight bytes.
  One tile per program (split-K to the limit) so that many independent load chains are in
  flight; fp32 atomics combine the tiles; _finalize_kernel adds the bias and casts.
  loop (_decode_loop_kernel, the first version): compact lists, each program loops over CPS chunks.
  pipe (_decode_pipe_kernel): the loop, software-pipelined by hand (three tiles of loads in
     flight per program); with 2 warps the fastest on an H100 and the untuned default.
  fused (_decode_fused_kernel): everything in one launch (in-register compaction by a sort,
     reduction by the last-arriving program); measured: no faster, launches are not the limit.
Prefill / larger T: _gemm_kernel decompresses [BK, 128] tiles on the fly into registers and runs
tl.dot (tensor cores for fp16/bf16; IEEE fp32 for fp32) with fp32 accumulation; no dense copy of
the weight exists. For few token blocks it also splits K (atomics) to fill the GPU.
Tiled path (gpu.tiled, a candidate for T > 8): _unpack_kernel writes W^T of a bounded chunk of
rows into a scratch and cuBLAS multiplies it; the weight is decompressed once per call, not once
per token block as in _gemm_kernel.
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
def _tile_index(bitmap_ptr, offsets_ptr, rb, K, cols, col_ok):
    """Columns `cols` [BK] of row block rb: where their values start [BK] and their words [BK, 4]."""
    col = rb * K + cols  # [BK] (rb, k) index
    start = tl.load(offsets_ptr + col, mask=col_ok, other=0)  # [BK]
    words = tl.load(bitmap_ptr + col[:, None] * 4 + tl.arange(0, 4)[None, :], mask=col_ok[:, None],
                    other=0)  # [BK, 4]
    return start, words


@triton.jit
def _tile_values(values_ptr, start, words, HW: tl.constexpr):
    """Weights [BK, 4, 32] in the values' dtype (0 where absent) from _tile_index's start and words.

    Per column (amortized over its 128 rows): popcounts and prefix of the 4 words; per element:
    two ALU ops, one popcount, one load and one select. The load is not masked: an absent
    weight's index is the rank of the next present one of its column (or the column's end), in
    bounds thanks to the layout's R elements of padding and in the sectors its neighbours read
    anyway; the select zeroes it. A masked load cost a predicate and a register zeroing more per
    element (sm_90 SASS, scripts/triton_sass.py: the pipe loop 19.5 -> 17.9 instructions per
    slot, the compact kernel 19.2 -> 16.8)."""
    bit = (1 << tl.arange(0, 32))[None, None, :]  # [1, 1, 32] this lane's bit (lane 31: sign bit)
    counts = _popc(words, HW)  # [BK, 4]
    base = (start[:, None] + tl.cumsum(counts, axis=1) - counts)[:, :, None]  # [BK, 4, 1] word starts
    w3 = words[:, :, None]  # [BK, 4, 1]
    present = (w3 & bit) != 0  # [BK, 4, 32]
    idx = base + _popc(w3 & (bit - 1), HW)  # [BK, 4, 32] rank of this lane's weight
    return tl.where(present, tl.load(values_ptr + idx), 0.0)


@triton.jit
def _load_tile(bitmap_ptr, offsets_ptr, values_ptr, rb, K, cols, col_ok, HW: tl.constexpr):
    """Columns `cols` [BK] of row block rb -> weights [BK, 4, 32] (0 where absent or not col_ok)."""
    start, words = _tile_index(bitmap_ptr, offsets_ptr, rb, K, cols, col_ok)
    return _tile_values(values_ptr, start, words, HW)


@triton.jit
def _add_row_block(out_ptr, acc, rb, T, N, BLOCK_B: tl.constexpr):
    """out[t, rb*128 + r] += acc[t, r // 32, r % 32] (fp32 atomics; rows >= N and tokens >= T masked)."""
    b = tl.arange(0, BLOCK_B)
    rows = rb * 128 + tl.arange(0, 4)[:, None] * 32 + tl.arange(0, 32)[None, :]  # [4, 32]
    ptrs = out_ptr + b[:, None, None] * N + rows[None, :, :]
    tl.atomic_add(ptrs, acc, mask=(b[:, None, None] < T) & (rows[None, :, :] < N))


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
def _decode_kernel(idx_ptr, xc_ptr, count_ptr, bitmap_ptr, offsets_ptr, values_ptr, out_ptr,
                   T, N, K, BLOCK_B: tl.constexpr, BK: tl.constexpr, CHUNK: tl.constexpr,
                   HW: tl.constexpr):
    """out[t, rb*128 + r] += the contribution of one tile of BK listed columns (one per program).

    One tile per program (no loop): a tile's loads form one dependent chain (list -> bitmap ->
    values) whose latency the GPU hides across many resident programs. Program (rb, q) takes
    slots [sub*BK, sub*BK + BK) of chunk q // (CHUNK/BK)'s active list and does nothing when the
    list is shorter (inactive columns cost no ALU work, no bytes)."""
    rb = tl.program_id(0)
    q = tl.program_id(1)
    b = tl.arange(0, BLOCK_B)
    jj = tl.arange(0, BK)
    c = q // (CHUNK // BK)
    j0 = (q % (CHUNK // BK)) * BK
    cnt = tl.load(count_ptr + c)
    if j0 < cnt:
        ok = j0 + jj < cnt
        slot = c * CHUNK + j0 + jj  # [BK] slots in the chunk's list
        cols = tl.load(idx_ptr + slot, mask=ok, other=0)  # [BK]
        xv = tl.load(xc_ptr + b[:, None] * K + slot[None, :],
                     mask=(b[:, None] < T) & ok[None, :], other=0.0)  # [BLOCK_B, BK] masked
        w = _load_tile(bitmap_ptr, offsets_ptr, values_ptr, rb, K, cols, ok, HW).to(tl.float32)
        acc = tl.sum(w[None, :, :, :] * xv[:, :, None, None], axis=1)  # [BLOCK_B, 4, 32]
        _add_row_block(out_ptr, acc, rb, T, N, BLOCK_B)


@triton.jit
def _tile_fma(acc, xv, bitmap_ptr, offsets_ptr, values_ptr, rb, K, cols, ok, HW: tl.constexpr):
    """acc [B, BK, 4, 32] += W[rb rows, cols] * xv [B, BK] (weights decompressed from the layout);
    the sum over the BK columns is left to the caller, once (a reduction per tile would cost a
    cross-thread exchange per tile)."""
    w = _load_tile(bitmap_ptr, offsets_ptr, values_ptr, rb, K, cols, ok, HW).to(tl.float32)
    return acc + w[None, :, :, :] * xv[:, :, None, None]


@triton.jit
def _sorted_tile(acc, order, g: tl.constexpr, x_ptr, thr, bitmap_ptr, offsets_ptr, values_ptr,
                 rb, c, T, K, BLOCK_B: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                 HW: tl.constexpr):
    """Tile g of a chunk's sorted column order [C/BK, BK] (entries >= C are inactive columns)."""
    group = tl.arange(0, C // BK)[:, None]
    sub = tl.sum(tl.where(group == g, order, 0), axis=0)  # [BK] row g of `order`
    ok = sub < C
    cols = c * C + tl.where(ok, sub, 0)
    b = tl.arange(0, BLOCK_B)
    xv = tl.load(x_ptr + b[:, None] * K + cols[None, :], mask=(b[:, None] < T) & ok[None, :],
                 other=0.0).to(tl.float32)
    xv = tl.where(tl.abs(xv) > thr, xv, 0.0)  # [BLOCK_B, BK] each token's own mask
    return _tile_fma(acc, xv, bitmap_ptr, offsets_ptr, values_ptr, rb, K, cols, ok, HW)


@triton.jit
def _decode_fused_kernel(x_ptr, thr_ptr, bitmap_ptr, offsets_ptr, values_ptr, bias_ptr, y_ptr,
                         ws_ptr, arrived_ptr, T, N, K, NUM_CHUNKS,
                         BLOCK_B: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HW: tl.constexpr):
    """The whole decode in one launch: program (rb, c) = row block rb x chunk c of C input columns.

    The chunk's columns are compacted in registers (a sort puts the active ones first, in column
    order) and the program runs its tiles of BK of them, skipping those past the active count.
    Reduction without extra launches: partial sums go by fp32 atomics into ws [T, N] (zero
    between calls); the program that arrives last for its row block (counter arrived[rb]) reads
    ws back while resetting it to zero (atomic exchange), adds the bias, writes y in y's dtype and
    resets the counter. So ws and arrived are zero again when the kernel ends."""
    rb = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.arange(0, BLOCK_B)
    tok = b[:, None] < T  # [BLOCK_B, 1]
    thr = tl.load(thr_ptr)
    acc4 = tl.zeros([BLOCK_B, BK, 4, 32], tl.float32)
    local = tl.arange(0, C)
    cols = c * C + local
    xin = tl.load(x_ptr + b[:, None] * K + cols[None, :], mask=tok & (cols[None, :] < K),
                  other=0.0).to(tl.float32)  # [BLOCK_B, C]
    active = tl.max((tl.abs(xin) > thr).to(tl.int32), axis=0)  # [C] any token (NaN: no)
    count = tl.sum(active, axis=0)
    order = tl.reshape(tl.sort(tl.where(active != 0, local, local + C)), [C // BK, BK])
    for g in tl.static_range(C // BK):
        if g * BK < count:
            acc4 = _sorted_tile(acc4, order, g, x_ptr, thr, bitmap_ptr, offsets_ptr, values_ptr,
                                rb, c, T, K, BLOCK_B, C, BK, HW)
    acc = tl.sum(acc4, axis=1)  # [BLOCK_B, 4, 32]
    rows = rb * 128 + tl.arange(0, 4)[:, None] * 32 + tl.arange(0, 32)[None, :]  # [4, 32]
    offs = b[:, None, None] * N + rows[None, :, :]  # [BLOCK_B, 4, 32]
    keep = (b[:, None, None] < T) & (rows[None, :, :] < N)
    tl.atomic_add(ws_ptr + offs, acc, mask=keep, sem="relaxed")
    tl.debug_barrier()  # every thread's partial sums before the (cumulative) release below
    if tl.atomic_add(arrived_ptr + rb, 1, sem="acq_rel") == NUM_CHUNKS - 1:  # last for rb
        # exchange as int32 bits (the same instruction; the interpreter only exchanges integers)
        ws_bits = ws_ptr.to(tl.pointer_type(tl.int32))
        total = tl.atomic_xchg(ws_bits + offs, tl.zeros([BLOCK_B, 4, 32], tl.int32), mask=keep)
        total = total.to(tl.float32, bitcast=True)
        if HAS_BIAS:
            total += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :, :]
        tl.store(y_ptr + offs, total.to(y_ptr.dtype.element_ty), mask=keep)
        tl.atomic_xchg(arrived_ptr + rb, 0)


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
    acc4 = tl.zeros([BLOCK_B, BK, 4, 32], tl.float32)  # summed over BK once, after the loop
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
            acc4 += w[None, :, :, :] * xv[:, :, None, None]
    acc = tl.sum(acc4, axis=1)  # [BLOCK_B, 4, 32]
    _add_row_block(out_ptr, acc, rb, T, N, BLOCK_B)


@triton.jit
def _pipe_slots(t, first, ntile, cnt, chunk, BK: tl.constexpr, CHUNK: tl.constexpr):
    """Virtual tile t of a program's chunks -> list slots [BK] and their validity (none valid
    past the last tile: no chunk is selected, so n = 0)."""
    sel = (t >= first) & (t < first + ntile)  # [CPS]: the chunk holding tile t (none past the end)
    c = tl.sum(tl.where(sel, chunk, 0), axis=0)
    j0 = (t - tl.sum(tl.where(sel, first, 0), axis=0)) * BK
    n = tl.sum(tl.where(sel, cnt, 0), axis=0)
    jj = j0 + tl.arange(0, BK)
    return c * CHUNK + jj, jj < n


@triton.jit
def _decode_pipe_kernel(idx_ptr, xc_ptr, count_ptr, bitmap_ptr, offsets_ptr, values_ptr, out_ptr,
                        T, N, K, NUM_CHUNKS,
                        BLOCK_B: tl.constexpr, BK: tl.constexpr, CPS: tl.constexpr,
                        CHUNK: tl.constexpr, HW: tl.constexpr):
    """The loop decode (program (rb, s) over the active lists of chunks [s*CPS, (s+1)*CPS)),
    software-pipelined by hand: a tile's loads form a chain (list slot -> column's words and
    offset -> values), and a plain loop waits for each link. Here iteration t multiplies tile t
    (values loaded in iteration t-1), issues the values loads of tile t+1 (words from t-1), the
    words of tile t+2 (columns from t-1) and the list of tile t+3: every load of an iteration is
    independent of the others, so a program has three tiles of loads in flight."""
    rb = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.arange(0, BLOCK_B)
    tok = b[:, None] < T
    chunk = s * CPS + tl.arange(0, CPS)
    cnt = tl.load(count_ptr + chunk, mask=chunk < NUM_CHUNKS, other=0)  # [CPS]
    ntile = (cnt + BK - 1) // BK
    first = tl.cumsum(ntile, axis=0) - ntile  # [CPS] first virtual tile of each chunk
    total = tl.sum(ntile, axis=0)
    # prologue: list of tiles 0..2, words of tiles 0..1, values of tile 0
    slot, ok_a = _pipe_slots(0, first, ntile, cnt, chunk, BK, CHUNK)
    cols_a = tl.load(idx_ptr + slot, mask=ok_a, other=0)
    xv_a = tl.load(xc_ptr + b[:, None] * K + slot[None, :], mask=tok & ok_a[None, :], other=0.0)
    start_b, words_b = _tile_index(bitmap_ptr, offsets_ptr, rb, K, cols_a, ok_a)
    xv_b = xv_a
    slot, ok_a = _pipe_slots(1, first, ntile, cnt, chunk, BK, CHUNK)
    cols_a = tl.load(idx_ptr + slot, mask=ok_a, other=0)
    xv_a = tl.load(xc_ptr + b[:, None] * K + slot[None, :], mask=tok & ok_a[None, :], other=0.0)
    w_c = _tile_values(values_ptr, start_b, words_b, HW)
    xv_c = xv_b
    start_b, words_b = _tile_index(bitmap_ptr, offsets_ptr, rb, K, cols_a, ok_a)
    xv_b = xv_a
    slot, ok_a = _pipe_slots(2, first, ntile, cnt, chunk, BK, CHUNK)
    cols_a = tl.load(idx_ptr + slot, mask=ok_a, other=0)
    xv_a = tl.load(xc_ptr + b[:, None] * K + slot[None, :], mask=tok & ok_a[None, :], other=0.0)
    acc4 = tl.zeros([BLOCK_B, BK, 4, 32], tl.float32)
    for t in range(0, total):
        acc4 += w_c.to(tl.float32)[None, :, :, :] * xv_c[:, :, None, None]  # tile t
        w_c = _tile_values(values_ptr, start_b, words_b, HW)  # tile t+1
        xv_c = xv_b
        start_b, words_b = _tile_index(bitmap_ptr, offsets_ptr, rb, K, cols_a, ok_a)  # tile t+2
        xv_b = xv_a
        slot, ok_a = _pipe_slots(t + 3, first, ntile, cnt, chunk, BK, CHUNK)  # tile t+3
        cols_a = tl.load(idx_ptr + slot, mask=ok_a, other=0)
        xv_a = tl.load(xc_ptr + b[:, None] * K + slot[None, :], mask=tok & ok_a[None, :], other=0.0)
    acc = tl.sum(acc4, axis=1)  # [BLOCK_B, 4, 32]
    _add_row_block(out_ptr, acc, rb, T, N, BLOCK_B)


@triton.jit
def _unpack_kernel(bitmap_ptr, offsets_ptr, values_ptr, wt_ptr, RB0, K, ROWS,
                   BK: tl.constexpr, HW: tl.constexpr):
    """wt [K, ROWS] = W^T of the rows [RB0*128, RB0*128 + ROWS) (zeros where pruned), for the tiled
    path's dense matmul. Program (i, c): row block RB0 + i x columns [c*BK, c*BK + BK). W^T, not W:
    a tile's lanes run along rows, so its stores to W^T are contiguous (to W they would be
    K elements apart)."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    cols = c * BK + tl.arange(0, BK)
    col_ok = cols < K
    w = _load_tile(bitmap_ptr, offsets_ptr, values_ptr, RB0 + i, K, cols, col_ok, HW)  # [BK, 4, 32]
    rows = i * 128 + tl.arange(0, 4)[:, None] * 32 + tl.arange(0, 32)[None, :]  # [4, 32] chunk-local
    ok = col_ok[:, None, None] & (rows[None, :, :] < ROWS)
    tl.store(wt_ptr + cols[:, None, None] * ROWS + rows[None, :, :], w, mask=ok)


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
