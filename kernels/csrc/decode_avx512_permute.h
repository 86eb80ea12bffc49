// The AVX-512 "permute" decoder (vpermw / vpermd under popcount prefixes): its walks of 1-3
// tokens, the slices walk of 4-12 tokens, the bf16 panel walk (vdpbf16ps), and its tile unpack.
// One part of the CPU kernel's single translation unit: dual_sparse_cpu.cpp includes them all.
#pragma once

#include "common.h"
#include "prefetch.h"

namespace {

// ---- AVX-512 "permute" decoder (F + BW + VPOPCNTDQ + BITALG): no expand instruction ----
// The block functions below repeat the expand ones' loop scaffolding on purpose: each decoder's
// code is compiled for exactly the instructions it needs (its own target attribute), so a CPU with
// one extension but not the other never meets an instruction it lacks; a shared template would
// need the union of both targets.
#define DS_AVX512_PERM \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,avx512bitalg,popcnt")))

// Lane i (32-bit) of the result = popcount(m & ((1 << i) - 1)): the position of row i among the
// packed values of its 16-row half word, when its bit is set (the fp32 decoder).
DS_AVX512_PERM inline __m512i prefix_counts(__m512i broadcast_mask, __m512i below) {
  return _mm512_popcnt_epi32(_mm512_and_si512(broadcast_mask, below));
}

DS_AVX512_PERM inline __m512i below_masks() {  // lane i: (1 << i) - 1
  alignas(64) uint32_t m[16];
  for (int i = 0; i < 16; ++i) m[i] = (1u << i) - 1;
  return _mm512_load_si512(m);
}

// 16-bit lanes 2i and 2i + 1 both (1 << i) - 1: the masks below rows i and 16 + i of a word.
DS_AVX512_PERM inline __m512i below_pairs() {
  alignas(64) uint16_t m[32];
  for (int i = 0; i < 16; ++i) m[2 * i] = m[2 * i + 1] = static_cast<uint16_t>((1u << i) - 1);
  return _mm512_load_si512(m);
}

// The bf16 values of one 32-row word gathered with a single vpermw: 32-bit lane i holds row i in
// its low half and row 16 + i in its high half (rows whose bit is clear hold garbage; callers
// mask them). Broadcasting the 32-bit mask puts its low 16 bits in the even 16-bit lanes and its
// high 16 bits in the odd ones, so one vpopcntw (AVX512-BITALG) of (mask & below_pairs) gives
// each row's rank within its half; the high rows then add the low half's count. Per word that is
// one popcount and one permute, where 16-row halves with vpopcntd take two of each (measured on
// the Zen 5 host: 7-12% less time for the whole walk).
DS_AVX512_PERM inline __m512i gather_word_bf16(uint32_t m, const uint16_t* v, __m512i pairs) {
  const __m512i rank_in_half = _mm512_popcnt_epi16(_mm512_and_si512(_mm512_set1_epi32(static_cast<int32_t>(m)), pairs));
  const int32_t low_count = _mm_popcnt_u32(m & 0xFFFFu);
  const __m512i idx = _mm512_add_epi16(rank_in_half, _mm512_set1_epi32(low_count << 16));
  return _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(v));  // padding covers the over-read
}

// The word's rows as fp32, rows 0-15 in lo and 16-31 in hi, absent rows zero: a bf16 in the high
// half of a 32-bit lane is that lane's fp32.
DS_AVX512_PERM inline void decode_word_bf16(uint32_t m, const uint16_t* v, __m512i pairs, __m512& lo, __m512& hi) {
  const __m512i g = gather_word_bf16(m, v, pairs);
  lo = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(static_cast<__mmask16>(m), g, 16));
  hi = _mm512_castsi512_ps(
      _mm512_maskz_and_epi32(static_cast<__mmask16>(m >> 16), g, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

// W: the words of the block that hold rows (2 in a last block of at most 64 rows, 4 otherwise)
template <int TB, int W>
DS_AVX512_PERM void block_bf16_permute(const Problem& p, int64_t rb, int64_t t0) {
  __m512 acc[TB][2 * W];  // [token][16-row chunk], rows in natural order
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int c = 0; c < 2 * W; ++c) acc[t][c] = _mm512_setzero_ps();
  const uint16_t* vals = static_cast<const uint16_t*>(p.values);
  const __m512i pairs = below_pairs();
  ValuePrefetch<uint16_t> prefetch(p, rb, false);
  for (int64_t j = 0; j < p.n_active; ++j) {
    const int64_t col = rb * p.K + p.active[j];
    const int32_t* words = p.bitmap + col * WORDS;
    const uint16_t* v = vals + p.offsets[col];
    prefetch.at(j, v);
    __m512 xb[TB];
    DS_UNROLL for (int t = 0; t < TB; ++t) xb[t] = _mm512_set1_ps(p.xc[j * p.T + t0 + t]);
    DS_UNROLL for (int c = 0; c < W; ++c) {
      const uint32_t m = static_cast<uint32_t>(words[c]);
      __m512 lo, hi;
      decode_word_bf16(m, v, pairs, lo, hi);
      v += _mm_popcnt_u32(m);
      DS_UNROLL for (int t = 0; t < TB; ++t) {
        acc[t][2 * c] = _mm512_fmadd_ps(lo, xb[t], acc[t][2 * c]);
        acc[t][2 * c + 1] = _mm512_fmadd_ps(hi, xb[t], acc[t][2 * c + 1]);
      }
    }
  }
  alignas(64) float out[TB * R];  // rows past 32 W are not stored (store_block stops at N)
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int c = 0; c < 2 * W; ++c) _mm512_store_ps(out + t * R + 16 * c, acc[t][c]);
  store_block(p, rb, t0, TB, out);
}

// W as in block_bf16_permute: the words of the block that hold rows
template <int TB, int W>
DS_AVX512_PERM void block_f32_permute(const Problem& p, int64_t rb, int64_t t0) {
  constexpr int CH = 2 * W;  // 16-row chunks
  __m512 acc[TB][CH];
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int c = 0; c < CH; ++c) acc[t][c] = _mm512_setzero_ps();
  const float* vals = static_cast<const float*>(p.values);
  const __m512i below = below_masks();
  ValuePrefetch<float> prefetch(p, rb, false);
  for (int64_t j = 0; j < p.n_active; ++j) {
    const int64_t col = rb * p.K + p.active[j];
    const int32_t* words = p.bitmap + col * WORDS;
    const float* v = vals + p.offsets[col];
    prefetch.at(j, v);
    __m512 xb[TB];
    DS_UNROLL for (int t = 0; t < TB; ++t) xb[t] = _mm512_set1_ps(p.xc[j * p.T + t0 + t]);
    DS_UNROLL for (int c = 0; c < CH; ++c) {
      const uint32_t m = (static_cast<uint32_t>(words[c / 2]) >> (16 * (c % 2))) & 0xFFFFu;
      const __m512 e = _mm512_maskz_permutexvar_ps(
          static_cast<__mmask16>(m), prefix_counts(_mm512_set1_epi32(static_cast<int32_t>(m)), below),
          _mm512_loadu_ps(v));
      v += _mm_popcnt_u32(m);
      DS_UNROLL for (int t = 0; t < TB; ++t) acc[t][c] = _mm512_fmadd_ps(e, xb[t], acc[t][c]);
    }
  }
  alignas(64) float out[TB * R];  // rows past 32 W are not stored (store_block stops at N)
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int c = 0; c < CH; ++c) _mm512_store_ps(out + t * R + 16 * c, acc[t][c]);
  store_block(p, rb, t0, TB, out);
}

// Batches of 4..12 tokens with the permute decoder, in one pass over the weights: 128 rows x 4
// tokens of fp32 accumulators would need 32 registers, so each chunk of columns is walked once per
// slice of rows, SW words (32 SW rows) at a time: 64-row halves (SW = 2, 4 TB <= 24 accumulators)
// for 4-6 tokens, 32-row quarters (SW = 1, 2 TB <= 24) for 7-12, while the chunk's packed bytes
// (about 9 KiB for 64 columns at p_w 0.5) are still in L1: every word is decoded once and read from
// DRAM once, where passes of 3 tokens would decode and stream it once per pass. Chunks of 64
// columns were 5-12% faster than 256 or 128 on the Zen 5 host at 4-6 tokens (32: level with 64).
constexpr int64_t HALVES_MIN_TB = 4, HALVES_MAX_TB = 6, QUARTERS_MAX_TB = 12;

template <int TB, int SW>
DS_AVX512_PERM void block_bf16_permute_slices(const Problem& p, int64_t rb, int64_t t0) {
  constexpr int64_t CHUNK = 64;
  constexpr int SLICES = WORDS / SW;
  alignas(64) float out[TB * R];  // [token][row], partial sums between chunks
  std::memset(out, 0, sizeof(out));
  const uint16_t* vals = static_cast<const uint16_t*>(p.values);
  const __m512i pairs = below_pairs();
  const int64_t slices = (block_rows(p, rb) + 32 * SW - 1) / (32 * SW);  // those holding rows
  for (int64_t j0 = 0; j0 < p.n_active; j0 += CHUNK) {
    const int64_t j1 = std::min(p.n_active, j0 + CHUNK);
    for (int h = 0; h < slices; ++h) {
      __m512 acc[TB][2 * SW];  // [token][16-row chunk of this slice]
      DS_UNROLL for (int t = 0; t < TB; ++t)
        for (int q = 0; q < 2 * SW; ++q) acc[t][q] = _mm512_load_ps(out + t * R + 32 * SW * h + 16 * q);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t col = rb * p.K + p.active[j];
        const int32_t* words = p.bitmap + col * WORDS;
        const uint16_t* v = vals + p.offsets[col];
        if (h == 0) prefetch_column<uint16_t>(p, rb, j + g_prefetch_ahead);
        for (int c = 0; c < SW * h; ++c) v += _mm_popcnt_u32(static_cast<uint32_t>(words[c]));
        const float* x = p.xc + j * p.T + t0;
        DS_UNROLL for (int c = 0; c < SW; ++c) {
          const uint32_t m = static_cast<uint32_t>(words[SW * h + c]);
          __m512 lo, hi;
          decode_word_bf16(m, v, pairs, lo, hi);
          v += _mm_popcnt_u32(m);
          DS_UNROLL for (int t = 0; t < TB; ++t) {  // the broadcast folds into the FMA's memory operand
            acc[t][2 * c] = _mm512_fmadd_ps(lo, _mm512_set1_ps(x[t]), acc[t][2 * c]);
            acc[t][2 * c + 1] = _mm512_fmadd_ps(hi, _mm512_set1_ps(x[t]), acc[t][2 * c + 1]);
          }
        }
      }
      DS_UNROLL for (int t = 0; t < TB; ++t)
        for (int q = 0; q < 2 * SW; ++q) _mm512_store_ps(out + t * R + 32 * SW * h + 16 * q, acc[t][q]);
    }
  }
  store_block(p, rb, t0, TB, out);
}

// The vdpbf16ps panel walk (block_bf16_dot_panel) needs AVX512-BF16; its own target attribute (see
// DS_AVX512_PERM).
#define DS_AVX512_DOT \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,avx512bitalg,avx512bf16,popcnt")))

// The same word (32 rows) of two columns, decoded straight into the panel's pair order: 32-bit lane
// i of lo holds (column 0, column 1) of row i, of hi those of row 16 + i; absent rows are zero. As in
// gather_word_bf16, one vpopcntw of a broadcast gives every row's rank, but the broadcast word
// joins the two columns' halves (column 0's 16 bits in the even 16-bit lanes, column 1's in the
// odd ones), so each output is one vpermt2w over both columns' values (index + 32 selects the
// second source) with a vptestmw of the same word zeroing the absent rows. Per pair of words that
// is 2 permutes where gathering each column and interleaving them took 2 permutes, 2 shifts and
// 2 blends (and twice the rank arithmetic): 0-8% less time at 4-8 tokens on the Zen 4 host, with the
// L2 prefetch below (level without it: the decoding then waited on memory, not on instructions).
DS_AVX512_DOT inline void gather_word_pair_bf16(uint32_t m0, const uint16_t* v0, uint32_t m1, const uint16_t* v1,
                                                __m512i pairs, __m512i& lo, __m512i& hi) {
  const __m512i row_bits = _mm512_add_epi16(pairs, _mm512_set1_epi16(1));  // lanes 2i, 2i + 1: 1 << i
  const __m512i src0 = _mm512_loadu_si512(v0), src1 = _mm512_loadu_si512(v1);
  const __m512i low = _mm512_set1_epi32(static_cast<int32_t>((m0 & 0xFFFFu) | (m1 << 16)));
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>((m0 >> 16) | (m1 & 0xFFFF0000u)));
  const uint32_t low0 = _mm_popcnt_u32(m0 & 0xFFFFu), low1 = _mm_popcnt_u32(m1 & 0xFFFFu);
  const __m512i idx_lo = _mm512_add_epi16(_mm512_popcnt_epi16(_mm512_and_si512(low, pairs)),
                                          _mm512_set1_epi32(32 << 16));
  const __m512i idx_hi = _mm512_add_epi16(_mm512_popcnt_epi16(_mm512_and_si512(high, pairs)),
                                          _mm512_set1_epi32(static_cast<int32_t>(((32 + low1) << 16) | low0)));
  lo = _mm512_maskz_permutex2var_epi16(_mm512_test_epi16_mask(low, row_bits), src0, idx_lo, src1);
  hi = _mm512_maskz_permutex2var_epi16(_mm512_test_epi16_mask(high, row_bits), src0, idx_hi, src1);
}

// From 5 tokens, on CPUs with AVX512-BF16 (vdpbf16ps: two bf16 products added to each fp32 lane),
// the panel walk: each chunk of PANEL_COLUMNS active columns is decoded once, the whole row block,
// into an L1 panel of column pairs (16 KiB): each word of a pair of columns permuted straight into
// (column 0, column 1) order per row, absent rows zero (gather_word_pair_bf16). The panel is then
// multiplied with the tokens like a dense GEMM micro-kernel: 64 rows (4 zmm of the panel) x up to PANEL_NR
// tokens of fp32 accumulators, so each vdpbf16ps costs a quarter of an input broadcast and a sixth
// of a panel load. Every word is read from DRAM once and decoded once whatever the batch (the
// slices walk decodes a word once per pass; the tiled path writes every weight to a scratch and
// torch.matmul re-reads it). On the Zen 5 host at p_w = p_x = 0.5, from DRAM, one thread: 0.73-0.96x
// of vLLM's pre-packed oneDNN GEMM at 7-64 tokens where the FMA slices walk (to 12) and the tiled
// path (above) gave 0.51-0.84x (docs/reports/cpu-2026-11-27-panel). From 6 tokens since the
// vptestmw zeroing mask (2026-11-28, Zen 5: 5-17% faster than the FMA halves walk at 6 tokens, 2-6%
// slower at 5); from 5 since the L2 prefetch below (Zen 4: 4-10% faster than the halves walk at 5
// tokens, 3-8% at 4; 4 waits for a measurement on Zen 5, where the halves walk is near oneDNN's
// GEMM at 4 tokens; docs/kernels.md).
// Memory: the decoding of a chunk waits on its loads and the multiplying loads nothing, so the
// first pass of the multiply prefetches the next chunk's columns into L2 (two per pair of the
// panel; past the row block's end, the next block's first chunk), and only a row block's first
// chunk prefetches ahead while decoding. With that and chunks of 64 columns (a 16 KiB panel; 128
// filled the 32 KiB L1 of a Zen 4 with the panel alone) and the pair gather, the Zen 4 host took
// 14-18% less time at 6-8 tokens from DRAM, 7-9% at 16, the same at 64 (2026-11-28 evening,
// docs/reports/cpu-2026-11-28-zen4-panel).
// Sums differ from the FMA walks' in rounding (two products per add; vdpbf16ps flushes denormals):
// tested against fp32 dense. set_bf16_dot_tokens(0, ...) restores the FMA walks.
constexpr int64_t PANEL_COLUMNS = 64;  // even
constexpr int PANEL_NR = 6;            // tokens per micro-kernel: 6 x 4 = 24 accumulators
// The panel walk from this many tokens (0: off; -1, the default: 4 or 5 as measured on this
// machine by panel_min_tokens in dispatch.h).
int64_t g_bf16_dot_min_tb = -1;
// ... up to this many; bf16 batches above take the tiled path. 256: with the AVX-512 input passes
// (2026-11-28) the panel walk beat the tiled path at 96-192 tokens (2-30% less time, most at small
// shapes) and was level at 256 (docs/kernels.md).
int64_t g_bf16_dot_max_tb = 256;

// out[t][64 rows] += sum over pairs i of panel[8 i + 0..3] . x[t P + i] (bf16 pairs), t < TB.
// next >= 0: while multiplying, prefetch the active columns from `next` on (two per pair; see
// block_bf16_dot_panel) into L2.
template <int TB>
DS_AVX512_DOT void panel_tokens(const __m512i* panel, int64_t n_pairs, const uint32_t* x, int64_t P, float* out,
                                const Problem& p, int64_t rb, int64_t next) {
  __m512 acc[TB][4];
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_load_ps(out + t * R + 16 * r);
  for (int64_t i = 0; i < n_pairs; ++i) {
    if (next >= 0) {
      prefetch_column<uint16_t, _MM_HINT_T1>(p, rb, next + 2 * i);
      prefetch_column<uint16_t, _MM_HINT_T1>(p, rb, next + 2 * i + 1);
    }
    __m512bh w[4];
    DS_UNROLL for (int r = 0; r < 4; ++r) w[r] = (__m512bh)_mm512_load_si512(panel + 8 * i + r);
    DS_UNROLL for (int t = 0; t < TB; ++t) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[t * P + i]));
      for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], w[r], b);
    }
  }
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int r = 0; r < 4; ++r) _mm512_store_ps(out + t * R + 16 * r, acc[t][r]);
}

// Active columns [j0, j1) of row block rb -> the pair panel: line 8 i + g holds rows 16 g .. 16 g + 15
// of columns j0 + 2 i and j0 + 2 i + 1 (absent rows, and the second column past j1, zero). Prefetches
// the column g_prefetch_ahead active columns ahead when `prefetch` (the panel walk does so only in a
// row block's first chunk, its multiply prefetches the next; the AMX path in every chunk).
DS_AVX512_DOT __attribute__((always_inline)) inline void decode_pair_panel(const Problem& p, int64_t rb, int64_t j0, int64_t j1, __m512i* panel,
                                                                              bool prefetch) {
  const uint16_t* vals = static_cast<const uint16_t*>(p.values);
  const __m512i pairs = below_pairs();
  for (int64_t j = j0; j < j1; j += 2) {
    const int64_t col0 = rb * p.K + p.active[j];
    const bool has1 = j + 1 < j1;
    const int64_t col1 = has1 ? rb * p.K + p.active[j + 1] : col0;
    const int32_t* w0 = p.bitmap + col0 * WORDS;
    const int32_t* w1 = p.bitmap + col1 * WORDS;
    const uint16_t* v0 = vals + p.offsets[col0];
    const uint16_t* v1 = vals + p.offsets[col1];
    if (prefetch) {
      prefetch_column<uint16_t>(p, rb, j + g_prefetch_ahead);
      prefetch_column<uint16_t>(p, rb, j + 1 + g_prefetch_ahead);
    }
    __m512i* dst = panel + 4 * (j - j0);  // pair (j - j0) / 2
    DS_UNROLL for (int c = 0; c < WORDS; ++c) {
      const uint32_t m0 = static_cast<uint32_t>(w0[c]);
      const uint32_t m1 = has1 ? static_cast<uint32_t>(w1[c]) : 0u;
      __m512i lo, hi;  // rows 32c + i and 32c + 16 + i, (column 0, column 1) in 32-bit lane i
      gather_word_pair_bf16(m0, v0, m1, v1, pairs, lo, hi);
      v0 += _mm_popcnt_u32(m0);
      v1 += _mm_popcnt_u32(m1);
      _mm512_store_si512(dst + 2 * c, lo);
      _mm512_store_si512(dst + 2 * c + 1, hi);
    }
  }
}

DS_AVX512_DOT void block_bf16_dot_panel(const Problem& p, int64_t rb, float* out /* [T, R], zeroed */) {
  alignas(64) __m512i panel[PANEL_COLUMNS / 2 * 2 * WORDS];  // [pair][16-row group of the block]
  const int halves = block_rows(p, rb) > 64 ? 2 : 1;  // those holding rows
  for (int64_t j0 = 0; j0 < p.n_active; j0 += PANEL_COLUMNS) {
    const int64_t j1 = std::min(p.n_active, j0 + PANEL_COLUMNS);
    // later chunks were fetched while the one before was multiplied
    decode_pair_panel(p, rb, j0, j1, panel, j0 == 0);
    const int64_t n_pairs = (j1 - j0 + 1) / 2;
    const uint32_t* x = p.xpairs + (j0 / PANEL_COLUMNS) * p.T * p.pairs;  // this chunk's [T, pairs]
    for (int half = 0; half < halves; ++half)
      for (int64_t t0 = 0; t0 < p.T; t0 += PANEL_NR) {
        const int64_t next = (half == 0 && t0 == 0) ? j1 : -1;  // the next chunk, in the first pass
        const __m512i* rows = panel + 4 * half;
        float* o = out + t0 * R + 64 * half;
        switch (std::min<int64_t>(PANEL_NR, p.T - t0)) {
          case 1: panel_tokens<1>(rows, n_pairs, x + t0 * p.pairs, p.pairs, o, p, rb, next); break;
          case 2: panel_tokens<2>(rows, n_pairs, x + t0 * p.pairs, p.pairs, o, p, rb, next); break;
          case 3: panel_tokens<3>(rows, n_pairs, x + t0 * p.pairs, p.pairs, o, p, rb, next); break;
          case 4: panel_tokens<4>(rows, n_pairs, x + t0 * p.pairs, p.pairs, o, p, rb, next); break;
          case 5: panel_tokens<5>(rows, n_pairs, x + t0 * p.pairs, p.pairs, o, p, rb, next); break;
          default: panel_tokens<6>(rows, n_pairs, x + t0 * p.pairs, p.pairs, o, p, rb, next); break;
        }
      }
  }
}

// The permute decoder's version of expand_column_avx512 (same output).
DS_AVX512_PERM inline void permute_column(const int32_t* words, const char* v, char* dst, int64_t esize) {
  if (esize == 2) {
    const __m512i pairs = below_pairs();
    // gather_word_bf16 leaves row i in 16-bit lane 2i (i < 16) or 2(i - 16) + 1: back to row order
    const __m512i rows = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                                          30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    DS_UNROLL for (int c = 0; c < WORDS; ++c) {
      const uint32_t m = static_cast<uint32_t>(words[c]);
      const __m512i g = gather_word_bf16(m, reinterpret_cast<const uint16_t*>(v), pairs);
      _mm512_storeu_si512(dst + 64 * c, _mm512_maskz_permutexvar_epi16(m, rows, g));
      v += 2 * _mm_popcnt_u32(m);
    }
  } else {
    const __m512i below = below_masks();
    for (int c = 0; c < 2 * WORDS; ++c) {
      const uint32_t m = (static_cast<uint32_t>(words[c / 2]) >> (16 * (c % 2))) & 0xFFFFu;
      _mm512_storeu_ps(reinterpret_cast<float*>(dst) + 16 * c,
                       _mm512_maskz_permutexvar_ps(static_cast<__mmask16>(m),
                                                   prefix_counts(_mm512_set1_epi32(static_cast<int32_t>(m)), below),
                                                   _mm512_loadu_ps(reinterpret_cast<const float*>(v))));
      v += 4 * _mm_popcnt_u32(m);
    }
  }
}

DS_AVX512_PERM void unpack_range_permute(const int32_t* bm, const int32_t* off, const char* vals, char* o,
                                         int64_t K, int64_t cols, int64_t rb0, int64_t rb1, int64_t esize,
                                         int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k)
    for (int64_t rb = rb0; rb < rb1; ++rb) {
      const int64_t col = rb * K + k;
      permute_column(bm + col * WORDS, vals + static_cast<int64_t>(off[col]) * esize,
                     o + (k * cols + (rb - rb0) * R) * esize, esize);
    }
}

}  // namespace
