// The CPU kernel of duoserve::dual_sparse_linear_q: the dual-sparse linear on int4/int8 codes
// (kernels/qlayout.py for the layout, kernels/qops.py for the op and its dispatch).
//
//   y[t, n] = sum_k Wq[n, k] * where(|x[t, k]| > thr, x[t, k], 0) + bias[n]   (fp32 accumulation)
//   Wq[n, k] = (c - 2^(b-1) + 1/2) * scale[rb, k / G, n % R]   for the code c of a kept (n, k)
//
// A walk for every token count: per row block (in parallel) and per chunk of tokens, the active
// columns (some token's |x| > thr) are walked in order; per column and 32-row word the set bits
// give the rows and each code is turned into its level in registers; no dequantized weight is ever
// written to memory, and inactive columns are skipped without reading a byte of them. Three walks
// (quant_decode below says which runs):
// - pairs (int4 codes, bf16 inputs, AVX512-BF16 + VBMI2): two columns of a group per `vdpbf16ps`,
//   sums in level units per group, scaled when the group ends (walk_block_pairs);
// - expand (AVX-512 VBMI2): per word one vpexpandb, levels times scales by one FMA per 16 rows,
//   fp32 FMAs into 3 tokens' accumulators (walk_block_simd);
// - scalar: a loop over set bits, 8 tokens a pass (walk_block).
// Its own translation unit: the extension's Python module is defined in dual_sparse_cpu.cpp; this
// file only registers the op's CPU kernel (the schema is defined in kernels/qops.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QR = 128;     // rows per row block (layout.py BLOCK_ROWS)
constexpr int64_t QWORDS = QR / 32;
constexpr int64_t QTB = 8;      // tokens per pass over a row block

struct QProblem {
  const int32_t* bitmap;   // [NB, K, QWORDS]
  const int32_t* offsets;  // [NB, K]
  const uint8_t* codes;    // int8: [nnz + R]; int4: two per byte, low nibble first
  const c10::Half* scales; // [NB, NG, R]
  const int32_t* active;   // [A] active columns, increasing
  int64_t n_active;
  const float* xc;         // [A, T] masked inputs of the active columns
  int64_t T, K, N, NG, G;
  int bits;
  float* y;                // [T, N] fp32
};

template <int BITS>
inline uint32_t code_at(const uint8_t* codes, int64_t pos) {
  if constexpr (BITS == 8) {
    return codes[pos];
  } else {
    return (codes[pos >> 1] >> ((pos & 1) * 4)) & 0xF;
  }
}

template <int BITS>
void walk_block(const QProblem& p, int64_t rb) {
  const float half = static_cast<float>((1 << (BITS - 1))) - 0.5f;
  float scale[QR];
  for (int64_t t0 = 0; t0 < p.T; t0 += QTB) {
    const int64_t tb = std::min<int64_t>(QTB, p.T - t0);
    float acc[QTB][QR];
    std::memset(acc, 0, sizeof(acc));
    int64_t group = -1;
    for (int64_t j = 0; j < p.n_active; ++j) {
      const int64_t k = p.active[j];
      const int64_t g = k / p.G;
      if (g != group) {  // columns are increasing: each group's scales converted once
        const c10::Half* s = p.scales + (rb * p.NG + g) * QR;
        for (int64_t r = 0; r < QR; ++r) scale[r] = static_cast<float>(s[r]);
        group = g;
      }
      float xv[QTB];
      for (int64_t t = 0; t < tb; ++t) xv[t] = p.xc[j * p.T + t0 + t];
      const int32_t* words = p.bitmap + (rb * p.K + k) * QWORDS;
      int64_t pos = p.offsets[rb * p.K + k];
      for (int64_t w = 0; w < QWORDS; ++w) {
        uint32_t m = static_cast<uint32_t>(words[w]);
        while (m) {
          const int64_t r = w * 32 + __builtin_ctz(m);
          m &= m - 1;
          const float wv = (static_cast<float>(code_at<BITS>(p.codes, pos++)) - half) * scale[r];
          for (int64_t t = 0; t < tb; ++t) acc[t][r] += wv * xv[t];
        }
      }
    }
    const int64_t rows = std::min<int64_t>(QR, p.N - rb * QR);
    for (int64_t t = 0; t < tb; ++t) {
      std::memcpy(p.y + (t0 + t) * p.N + rb * QR, acc[t], rows * sizeof(float));
    }
  }
}

// ---- AVX-512 walk (VBMI + VBMI2): per 32-row word, the word's codes are expanded into their rows
// with one vpexpandb under the word's mask, widened to fp32 and turned into levels with one masked
// FMA per 16 rows (c * s - (2^(b-1) - 1/2) * s; absent rows zeroed by the mask); int4 codes are
// first split into bytes in nibble order with one vpermt2b. Tokens in chunks of 3 (3 x 8 zmm
// accumulators, as the float walk).
constexpr int64_t QSIMD_TB = 3;

// vpermt2b indices that split int4 codes into bytes in nibble order: byte j <- nibble j (+1) of the
// lo (index < 64) or hi (index >= 64) nibbles, for an even / odd first nibble. Built once; both int4
// walks load them by address (a branch on the parity mispredicts half the time: 2.2x at one token on
// the Zen 4 host).
struct NibbleOrder {
  alignas(64) uint8_t order[2][64];
  NibbleOrder() {
    for (int j = 0; j < 64; ++j) {
      order[0][j] = static_cast<uint8_t>((j >> 1) + ((j & 1) ? 64 : 0));
      order[1][j] = static_cast<uint8_t>(((j + 1) >> 1) + (((j + 1) & 1) ? 64 : 0));
    }
  }
};

const NibbleOrder& nibble_order() {
  static const NibbleOrder table;
  return table;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2")))
inline __m256i word_codes_int4(const uint8_t* codes, int64_t pos, const uint8_t* nibble_order) {
  // 32 bytes hold nibbles [pos & ~1, pos & ~1 + 64): enough for the 32 codes from pos (padding
  // of R codes at the end of the stream keeps the load in bounds)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (pos >> 1)));
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m512i lo = _mm512_castsi256_si512(_mm256_and_si256(raw, nib));
  const __m512i hi = _mm512_castsi256_si512(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib));
  const __m512i ordered = _mm512_permutex2var_epi8(lo, _mm512_load_si512(nibble_order + 64 * (pos & 1)), hi);
  return _mm512_castsi512_si256(ordered);  // code of nibble pos + j in byte j
}

template <int BITS, int TB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2")))
void walk_block_simd_tb(const QProblem& p, int64_t rb, int64_t t0) {
  const float half = static_cast<float>((1 << (BITS - 1))) - 0.5f;
  const uint8_t* order = nibble_order().order[0];
  __m512 acc[TB][8];
  for (int t = 0; t < TB; ++t)
    for (int h = 0; h < 8; ++h) acc[t][h] = _mm512_setzero_ps();
  __m512 sc[8], off[8];
  int64_t group = -1;
  for (int64_t j = 0; j < p.n_active; ++j) {
    const int64_t k = p.active[j];
    const int64_t g = k / p.G;
    if (g != group) {
      const c10::Half* s = p.scales + (rb * p.NG + g) * QR;
      for (int h = 0; h < 8; ++h) {
        sc[h] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16 * h)));
        off[h] = _mm512_mul_ps(sc[h], _mm512_set1_ps(-half));
      }
      group = g;
    }
    __m512 xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_set1_ps(p.xc[j * p.T + t0 + t]);
    const int32_t* words = p.bitmap + (rb * p.K + k) * QWORDS;
    int64_t pos = p.offsets[rb * p.K + k];
    for (int w = 0; w < QWORDS; ++w) {
      const uint32_t m = static_cast<uint32_t>(words[w]);
      if (!m) continue;
      __m256i c32;
      if constexpr (BITS == 8) {
        c32 = _mm256_maskz_expandloadu_epi8(m, p.codes + pos);
      } else {
        c32 = _mm256_maskz_expand_epi8(m, word_codes_int4(p.codes, pos, order));
      }
      pos += __builtin_popcount(m);
      const __m512 c_lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(c32)));
      const __m512 c_hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(c32, 1)));
      const __m512 w_lo = _mm512_maskz_fmadd_ps(static_cast<__mmask16>(m), c_lo, sc[2 * w], off[2 * w]);
      const __m512 w_hi = _mm512_maskz_fmadd_ps(static_cast<__mmask16>(m >> 16), c_hi, sc[2 * w + 1], off[2 * w + 1]);
      for (int t = 0; t < TB; ++t) {
        acc[t][2 * w] = _mm512_fmadd_ps(w_lo, xv[t], acc[t][2 * w]);
        acc[t][2 * w + 1] = _mm512_fmadd_ps(w_hi, xv[t], acc[t][2 * w + 1]);
      }
    }
  }
  const int64_t rows = std::min<int64_t>(QR, p.N - rb * QR);
  for (int t = 0; t < TB; ++t) {
    float* out = p.y + (t0 + t) * p.N + rb * QR;
    if (rows == QR) {
      for (int h = 0; h < 8; ++h) _mm512_storeu_ps(out + 16 * h, acc[t][h]);
    } else {
      alignas(64) float tmp[QR];
      for (int h = 0; h < 8; ++h) _mm512_store_ps(tmp + 16 * h, acc[t][h]);
      std::memcpy(out, tmp, rows * sizeof(float));
    }
  }
}

template <int BITS>
void walk_block_simd(const QProblem& p, int64_t rb) {
  for (int64_t t0 = 0; t0 < p.T; t0 += QSIMD_TB) {
    const int64_t tb = std::min<int64_t>(QSIMD_TB, p.T - t0);
    if (tb == 3) walk_block_simd_tb<BITS, 3>(p, rb, t0);
    else if (tb == 2) walk_block_simd_tb<BITS, 2>(p, rb, t0);
    else walk_block_simd_tb<BITS, 1>(p, rb, t0);
  }
}

// ---- int4 pair walk (AVX512-BF16 + VBMI2): the products of two active columns of one group in one
// `vdpbf16ps`. A level c - 7.5 of a 4-bit code is exact in bf16, and so is a bf16 input, so each
// product is exact and only the fp32 sums round. Per pair of columns and 64-row half: each column's
// codes are split into bytes and expanded into their rows (half_rows_int4; absent rows get code 16,
// whose level in the table is 0); per 16 rows one masked `vpermt2b` puts the two columns' codes into
// the 16-bit halves of each row's 32-bit lane and one `vpermw` over a 17-entry bf16 table turns them
// into levels, which one `vdpbf16ps` per token multiplies with the broadcast pair of inputs. Sums are
// kept per group in level units and multiplied by the group's row scales when the group ends, so no
// scale is applied per word. A group with an odd number of active columns pairs its last one with
// itself and an input of 0. Per 64 rows of a pair: 12 shuffles, which set its speed (Zen 4: one a cycle).
constexpr int64_t QPAIR_TB = 6;  // tokens a pass from 3 tokens on (24 accumulators for a 64-row half)
// Prefetch distance in pairs; 6, 16 and 32 measured within noise of each other (Zen 4, one token).
constexpr int64_t QPAIR_AHEAD = 16;

struct QPairs {
  std::vector<int32_t> k1, k2, group;  // [P]
  std::vector<uint32_t> x;             // [P, T]: bf16(x of k1) | bf16(x of k2) << 16
};

inline uint16_t to_bf16_bits(float v) {  // inputs come from bf16, so this is exact (no rounding needed)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>(u >> 16);
}

// The active columns (increasing) paired within their groups into q.k1 / q.k2 / q.group: two
// consecutive active columns of one group make a pair; a column alone in its group is paired with
// itself and gets an input of 0 (k2 == k1). Both int4 walks read these.
void pair_columns(const std::vector<int32_t>& active, int64_t G, QPairs& q) {
  const int64_t A = static_cast<int64_t>(active.size());
  q.k1.reserve(A / 2 + 1); q.k2.reserve(A / 2 + 1); q.group.reserve(A / 2 + 1);
  for (int64_t j = 0; j < A;) {
    const int64_t g = active[j] / G;
    const bool two = j + 1 < A && active[j + 1] / G == g;
    q.k1.push_back(active[j]);
    q.k2.push_back(two ? active[j + 1] : active[j]);
    q.group.push_back(static_cast<int32_t>(g));
    j += two ? 2 : 1;
  }
}

// The pair walk's pairs and inputs, pair-major [P, T] from the masked inputs xc [A, T].
QPairs make_pairs(const std::vector<int32_t>& active, const std::vector<float>& xc, int64_t T, int64_t G) {
  QPairs q;
  pair_columns(active, G, q);
  const int64_t P = static_cast<int64_t>(q.k1.size());
  q.x.reserve(P * T);
  for (int64_t i = 0, j = 0; i < P; ++i) {  // j: the pair's first column in active
    const bool two = q.k2[i] != q.k1[i];
    for (int64_t t = 0; t < T; ++t) {
      const uint32_t lo = to_bf16_bits(xc[j * T + t]);
      const uint32_t hi = two ? to_bf16_bits(xc[(j + 1) * T + t]) : 0u;
      q.x.push_back(lo | (hi << 16));
    }
    j += two ? 2 : 1;
  }
  return q;
}

// The codes of 64 rows of one column (a half row block: two bitmap words) in their rows, one byte
// each: the 64 nibbles from `pos` are split into bytes in nibble order (one vpermt2b; the index
// table for an odd first nibble is loaded by address: NibbleOrder) and one vpexpandb puts them under
// the mask; absent rows get 16.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16")))
inline __m512i half_rows_int4(const uint8_t* codes, int64_t pos, uint64_t m, const uint8_t* nibble_order,
                              __m512i nib, __m512i absent) {
  // 64 bytes from the byte of nibble pos: the stream's R codes of padding keep this in bounds
  const __m512i raw = _mm512_loadu_si512(codes + (pos >> 1));
  const __m512i lo = _mm512_and_si512(raw, nib);
  const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
  const __m512i idx = _mm512_load_si512(nibble_order + 64 * (pos & 1));
  return _mm512_mask_expand_epi8(absent, m, _mm512_permutex2var_epi8(lo, idx, hi));
}

// The pair walk's constant permute indices and level table, built once.
struct PairTables {
  NibbleOrder nibbles;  // a copy beside the other tables: read through `tab`, the walk keeps one base register
  alignas(64) uint8_t inter[4][64];  // two columns' row codes to 32-bit lanes, rows 16i.. for inter[i]
  alignas(64) uint16_t levels[32];   // bf16 of c - 7.5 for a code c < 16; 0 for 16 (an absent row)
  PairTables() {
    for (int j = 0; j < 64; ++j) {
      // byte 4r <- column 1's row r, byte 4r + 2 <- column 2's (the odd bytes are zeroed by the
      // permute's mask), so each 16-bit half of lane r holds one column's code
      for (int i = 0; i < 4; ++i) inter[i][j] = static_cast<uint8_t>(16 * i + (j >> 2) + ((j & 2) ? 64 : 0));
    }
    for (int c = 0; c < 32; ++c) levels[c] = to_bf16_bits(c < 16 ? static_cast<float>(c) - 7.5f : 0.0f);
  }
};

const PairTables& pair_tables() {
  static const PairTables tables;
  return tables;
}

// The bitmap words and first code line of pair q's two columns in row block rb: the int4 walks fetch
// them QPAIR_AHEAD pairs ahead, because skipped columns leave gaps in the streams that the hardware
// prefetchers do not follow.
inline void prefetch_pair(const QProblem& p, const QPairs& pairs, int64_t rb, int64_t q) {
  const int64_t a1 = rb * p.K + pairs.k1[q], a2 = rb * p.K + pairs.k2[q];
  _mm_prefetch(reinterpret_cast<const char*>(p.bitmap + a1 * QWORDS), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p.bitmap + a2 * QWORDS), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p.codes + (p.offsets[a1] >> 1)), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p.codes + (p.offsets[a2] >> 1)), _MM_HINT_T0);
}

// A group's sums, in level units, times its row scales into the row block's outputs (the NH 64-row
// halves from h0); the sums restart.
template <int TB, int NH>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16")))
inline void flush_group(const QProblem& p, int64_t rb, int64_t g, int h0, __m512 (&acc)[TB][4 * NH],
                        float (&out)[TB][QR]) {
  const c10::Half* s = p.scales + (rb * p.NG + g) * QR + 64 * h0;
  for (int i = 0; i < 4 * NH; ++i) {
    const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16 * i)));
    for (int t = 0; t < TB; ++t) {
      float* o = out[t] + 64 * h0 + 16 * i;
      _mm512_store_ps(o, _mm512_fmadd_ps(acc[t][i], sc, _mm512_load_ps(o)));
      acc[t][i] = _mm512_setzero_ps();
    }
  }
}

// One pass of the pair walk over row block rb for tokens t0..t0+TB and the NH 64-row halves from h0
// (NH 2: the whole block, each pair's decode shared by TB <= 2 tokens; NH 1: one half, so that up to
// QPAIR_TB = 6 tokens' accumulators fit the registers and share it).
template <int TB, int NH>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16")))
void walk_block_pairs_tb(const QProblem& p, const QPairs& pairs, int64_t rb, int64_t t0, int h0) {
  const PairTables& tab = pair_tables();
  const __m512i inter0 = _mm512_load_si512(tab.inter[0]), inter1 = _mm512_load_si512(tab.inter[1]);
  const __m512i inter2 = _mm512_load_si512(tab.inter[2]), inter3 = _mm512_load_si512(tab.inter[3]);
  const __mmask64 even_bytes = 0x5555555555555555ull;
  const __m512i levels = _mm512_load_si512(tab.levels);
  const __m512i absent = _mm512_set1_epi8(16), nib = _mm512_set1_epi8(0x0F);
  alignas(64) float out[TB][QR];
  std::memset(out, 0, sizeof(out));
  __m512 acc[TB][4 * NH];
  for (int t = 0; t < TB; ++t)
    for (int i = 0; i < 4 * NH; ++i) acc[t][i] = _mm512_setzero_ps();
  const int64_t P = static_cast<int64_t>(pairs.k1.size());
  int64_t group = P ? pairs.group[0] : 0;
  for (int64_t q = 0; q < P; ++q) {
    if (pairs.group[q] != group) {
      flush_group<TB, NH>(p, rb, group, h0, acc, out);
      group = pairs.group[q];
    }
    if (q + QPAIR_AHEAD < P) prefetch_pair(p, pairs, rb, q + QPAIR_AHEAD);
    const int64_t k1 = pairs.k1[q], k2 = pairs.k2[q];
    const int32_t* w1 = p.bitmap + (rb * p.K + k1) * QWORDS;
    const int32_t* w2 = p.bitmap + (rb * p.K + k2) * QWORDS;
    int64_t pos1 = p.offsets[rb * p.K + k1], pos2 = p.offsets[rb * p.K + k2];
    if (h0 == 1) {  // the second half's codes follow the first half's
      pos1 += __builtin_popcount(static_cast<uint32_t>(w1[0])) + __builtin_popcount(static_cast<uint32_t>(w1[1]));
      pos2 += __builtin_popcount(static_cast<uint32_t>(w2[0])) + __builtin_popcount(static_cast<uint32_t>(w2[1]));
    }
    __m512i xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_set1_epi32(static_cast<int>(pairs.x[q * p.T + t0 + t]));
    for (int j = 0; j < NH; ++j) {
      const int h = h0 + j;
      const uint64_t m1 = static_cast<uint32_t>(w1[2 * h]) | static_cast<uint64_t>(static_cast<uint32_t>(w1[2 * h + 1])) << 32;
      const uint64_t m2 = static_cast<uint32_t>(w2[2 * h]) | static_cast<uint64_t>(static_cast<uint32_t>(w2[2 * h + 1])) << 32;
      if (!(m1 | m2)) continue;
      const __m512i c1 = half_rows_int4(p.codes, pos1, m1, tab.nibbles.order[0], nib, absent);
      const __m512i c2 = half_rows_int4(p.codes, pos2, m2, tab.nibbles.order[0], nib, absent);
      pos1 += __builtin_popcountll(m1);
      pos2 += __builtin_popcountll(m2);
      const __m512i lv[4] = {  // per 16 rows, the pair (level of column 1, level of column 2) in bf16
          _mm512_permutexvar_epi16(_mm512_maskz_permutex2var_epi8(even_bytes, c1, inter0, c2), levels),
          _mm512_permutexvar_epi16(_mm512_maskz_permutex2var_epi8(even_bytes, c1, inter1, c2), levels),
          _mm512_permutexvar_epi16(_mm512_maskz_permutex2var_epi8(even_bytes, c1, inter2, c2), levels),
          _mm512_permutexvar_epi16(_mm512_maskz_permutex2var_epi8(even_bytes, c1, inter3, c2), levels)};
      for (int t = 0; t < TB; ++t)
        for (int i = 0; i < 4; ++i) acc[t][4 * j + i] = _mm512_dpbf16_ps(acc[t][4 * j + i], (__m512bh)lv[i], (__m512bh)xv[t]);
    }
  }
  if (P) flush_group<TB, NH>(p, rb, group, h0, acc, out);
  const int64_t first = 64 * h0, rows = std::min<int64_t>(64 * NH, p.N - rb * QR - first);
  if (rows <= 0) return;
  for (int t = 0; t < TB; ++t)
    std::memcpy(p.y + (t0 + t) * p.N + rb * QR + first, out[t] + first, rows * sizeof(float));
}

// 1-2 tokens: whole row blocks, 2 tokens a pass; 3 and more: each 64-row half in its own pass, up to
// QPAIR_TB = 6 tokens a pass (a half's decode shared by them; the pair's scalar work is repeated).
void walk_block_pairs(const QProblem& p, const QPairs& pairs, int64_t rb) {
  if (p.T <= 2) {
    if (p.T == 2) walk_block_pairs_tb<2, 2>(p, pairs, rb, 0, 0);
    else walk_block_pairs_tb<1, 2>(p, pairs, rb, 0, 0);
    return;
  }
  for (int64_t t0 = 0; t0 < p.T; t0 += QPAIR_TB) {
    const int64_t tb = std::min<int64_t>(QPAIR_TB, p.T - t0);
    for (int h0 = 0; h0 < 2; ++h0) {
      if (tb == 6) walk_block_pairs_tb<6, 1>(p, pairs, rb, t0, h0);
      else if (tb == 5) walk_block_pairs_tb<5, 1>(p, pairs, rb, t0, h0);
      else if (tb == 4) walk_block_pairs_tb<4, 1>(p, pairs, rb, t0, h0);
      else if (tb == 3) walk_block_pairs_tb<3, 1>(p, pairs, rb, t0, h0);
      else if (tb == 2) walk_block_pairs_tb<2, 1>(p, pairs, rb, t0, h0);
      else walk_block_pairs_tb<1, 1>(p, pairs, rb, t0, h0);
    }
  }
}

// ---- int4 panel walk (from QPANEL_MIN_TB tokens, the same instructions as the pair walk): the pair
// walk decodes each 64-row half once per pass of up to 6 tokens, so a batch of T tokens decodes
// every code ceil(T / 6) times. The panel walk decodes a chunk of up to QPANEL_PAIRS pairs of one
// group once per row block into an L1 panel of bf16 levels (line 8 i + 4 h + r: rows 64 h + 16 r ..
// of pair i, the layout of the bf16 panel walk), then multiplies it with every token as a GEMM
// micro-kernel (64 rows x 6 tokens of accumulators); the chunk's sums, in level units, are
// multiplied by the group's row scales into the row block's fp32 scratch. From 7 tokens by
// construction: below, the pair walk decodes each half once as well and has no panel to store.
constexpr int64_t QPANEL_PAIRS = 32;   // 32 pairs x 8 lines x 64 B: a 16 KiB panel
constexpr int64_t QPANEL_MIN_TB = 7;
constexpr int QPANEL_NR = 6;           // tokens per micro-kernel: 6 x 4 accumulators

// The panel walk's inputs, built from x [T, K] (bf16) row by row: the active columns (some token's
// |x| > thr; NaN fails the comparison), their pairs within groups (pair_columns), the chunks of pairs
// (up to QPANEL_PAIRS consecutive pairs of one group, the same for every row block) as their ends, and
// the masked inputs chunk-major: chunk [q0, q1) holds its pairs' inputs token after token at
// x[q0 T + t (q1 - q0) + i], so a micro-kernel reads contiguous inputs. Row by row because the
// column-by-column scan of active_columns and the pair-major [P, T] inputs of make_pairs cost more
// than the panel walk itself at 256 tokens of a 576 x 1536 weight (perf, Zen 4).
std::vector<int64_t> panel_inputs(const uint16_t* x, int64_t T, int64_t K, float thr, int64_t G, QPairs& q,
                                  std::vector<int32_t>& active) {
  std::vector<uint8_t> any(K, 0);
  for (int64_t t = 0; t < T; ++t) {
    const uint16_t* row = x + t * K;
    for (int64_t c = 0; c < K; ++c) {
      const uint32_t bits = static_cast<uint32_t>(row[c] & 0x7FFFu) << 16;  // |x| as fp32 bits
      float v;
      std::memcpy(&v, &bits, 4);
      any[c] |= static_cast<uint8_t>(v > thr);
    }
  }
  active.clear();
  for (int64_t c = 0; c < K; ++c)
    if (any[c]) active.push_back(static_cast<int32_t>(c));
  pair_columns(active, G, q);
  const int64_t P = static_cast<int64_t>(q.k1.size());
  std::vector<int64_t> ends;
  for (int64_t q0 = 0; q0 < P;) {
    int64_t q1 = q0 + 1;
    while (q1 < P && q1 - q0 < QPANEL_PAIRS && q.group[q1] == q.group[q0]) ++q1;
    ends.push_back(q1);
    q0 = q1;
  }
  const auto masked = [thr](uint16_t b) -> uint32_t {
    const uint32_t bits = static_cast<uint32_t>(b & 0x7FFFu) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return v > thr ? b : 0u;
  };
  q.x.resize(P * T);
  int64_t q0 = 0;
  for (const int64_t q1 : ends) {
    const int64_t n = q1 - q0;
    for (int64_t t = 0; t < T; ++t) {
      const uint16_t* row = x + t * K;
      uint32_t* dst = q.x.data() + q0 * T + t * n;
      for (int64_t i = 0; i < n; ++i) {
        const int32_t k1 = q.k1[q0 + i], k2 = q.k2[q0 + i];
        dst[i] = masked(row[k1]) | (k2 != k1 ? masked(row[k2]) << 16 : 0u);
      }
    }
    q0 = q1;
  }
  return ends;
}

// Pairs [q0, q1) of row block rb -> panel (the 64-row halves below `halves`).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16")))
void decode_q_panel(const QProblem& p, const QPairs& pairs, int64_t rb, int64_t q0, int64_t q1, int halves,
                    __m512i* panel) {
  const PairTables& tab = pair_tables();
  const __m512i inter0 = _mm512_load_si512(tab.inter[0]), inter1 = _mm512_load_si512(tab.inter[1]);
  const __m512i inter2 = _mm512_load_si512(tab.inter[2]), inter3 = _mm512_load_si512(tab.inter[3]);
  const __mmask64 even_bytes = 0x5555555555555555ull;
  const __m512i levels = _mm512_load_si512(tab.levels);
  const __m512i absent = _mm512_set1_epi8(16), nib = _mm512_set1_epi8(0x0F);
  const int64_t P = static_cast<int64_t>(pairs.k1.size());
  for (int64_t q = q0; q < q1; ++q) {
    if (q + QPAIR_AHEAD < P) prefetch_pair(p, pairs, rb, q + QPAIR_AHEAD);
    const int64_t k1 = pairs.k1[q], k2 = pairs.k2[q];
    const int32_t* w1 = p.bitmap + (rb * p.K + k1) * QWORDS;
    const int32_t* w2 = p.bitmap + (rb * p.K + k2) * QWORDS;
    int64_t pos1 = p.offsets[rb * p.K + k1], pos2 = p.offsets[rb * p.K + k2];
    __m512i* dst = panel + 8 * (q - q0);
    for (int h = 0; h < halves; ++h) {
      const uint64_t m1 = static_cast<uint32_t>(w1[2 * h]) | static_cast<uint64_t>(static_cast<uint32_t>(w1[2 * h + 1])) << 32;
      const uint64_t m2 = static_cast<uint32_t>(w2[2 * h]) | static_cast<uint64_t>(static_cast<uint32_t>(w2[2 * h + 1])) << 32;
      if (!(m1 | m2)) {
        for (int r = 0; r < 4; ++r) _mm512_store_si512(dst + 4 * h + r, _mm512_setzero_si512());
        continue;
      }
      const __m512i c1 = half_rows_int4(p.codes, pos1, m1, tab.nibbles.order[0], nib, absent);
      const __m512i c2 = half_rows_int4(p.codes, pos2, m2, tab.nibbles.order[0], nib, absent);
      pos1 += __builtin_popcountll(m1);
      pos2 += __builtin_popcountll(m2);
      // per 16 rows, the pair (level of column 1, level of column 2) in bf16, as in the pair walk
      const __m512i inter[4] = {inter0, inter1, inter2, inter3};
      for (int r = 0; r < 4; ++r) {
        const __m512i codes = _mm512_maskz_permutex2var_epi8(even_bytes, c1, inter[r], c2);
        _mm512_store_si512(dst + 4 * h + r, _mm512_permutexvar_epi16(codes, levels));
      }
    }
  }
}

// out[t][64 rows] += scale * sum over pairs i of panel[8 i + 0..3] . x[t n_pairs + i] (bf16 pairs), t < TB.
template <int TB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16")))
void qpanel_tokens(const __m512i* panel, int64_t n_pairs, const uint32_t* x, const __m512 (&sc)[4], float* out) {
  __m512 acc[TB][4];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n_pairs; ++i) {
    __m512bh w[4];
    for (int r = 0; r < 4; ++r) w[r] = (__m512bh)_mm512_load_si512(panel + 8 * i + r);
    for (int t = 0; t < TB; ++t) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(x[t * n_pairs + i]));
      for (int r = 0; r < 4; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], w[r], b);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < 4; ++r) {
      float* o = out + t * QR + 16 * r;
      _mm512_store_ps(o, _mm512_fmadd_ps(acc[t][r], sc[r], _mm512_load_ps(o)));
    }
}

// Row block rb for every token; out: [T][QR] fp32 scratch, 64-byte aligned.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512bf16")))
void walk_block_qpanel(const QProblem& p, const QPairs& pairs, const std::vector<int64_t>& chunk_ends, int64_t rb,
                       float* out) {
  alignas(64) __m512i panel[QPANEL_PAIRS * 8];
  const int64_t rows = std::min<int64_t>(QR, p.N - rb * QR);
  const int halves = rows > 64 ? 2 : 1;
  std::memset(out, 0, p.T * QR * sizeof(float));
  int64_t q0 = 0;
  for (const int64_t q1 : chunk_ends) {
    const int32_t g = pairs.group[q0];
    const int64_t n = q1 - q0;
    decode_q_panel(p, pairs, rb, q0, q1, halves, panel);
    const c10::Half* s = p.scales + (rb * p.NG + g) * QR;
    for (int h = 0; h < halves; ++h) {
      __m512 sc[4];
      for (int r = 0; r < 4; ++r)
        sc[r] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 64 * h + 16 * r)));
      for (int64_t t0 = 0; t0 < p.T; t0 += QPANEL_NR) {
        const uint32_t* x = pairs.x.data() + q0 * p.T + t0 * n;
        float* o = out + t0 * QR + 64 * h;
        switch (std::min<int64_t>(QPANEL_NR, p.T - t0)) {
          case 1: qpanel_tokens<1>(panel + 4 * h, n, x, sc, o); break;
          case 2: qpanel_tokens<2>(panel + 4 * h, n, x, sc, o); break;
          case 3: qpanel_tokens<3>(panel + 4 * h, n, x, sc, o); break;
          case 4: qpanel_tokens<4>(panel + 4 * h, n, x, sc, o); break;
          case 5: qpanel_tokens<5>(panel + 4 * h, n, x, sc, o); break;
          default: qpanel_tokens<6>(panel + 4 * h, n, x, sc, o); break;
        }
      }
    }
    q0 = q1;
  }
  for (int64_t t = 0; t < p.T; ++t) std::memcpy(p.y + t * p.N + rb * QR, out + t * QR, rows * sizeof(float));
}

bool cpu_has_pair_decode() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
                         __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

bool cpu_has_simd_decode() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
                         __builtin_cpu_supports("avx512vbmi2");
  return ok;
}

enum class QDecode { kScalar, kExpand, kPairs, kPanel };

// Which walk runs: for int4 codes with bf16 inputs where the CPU has AVX512-BF16 and VBMI2, the pair
// walk below QPANEL_MIN_TB tokens and the panel walk from there; the expand walk (fp32 FMAs) for
// the rest where it has VBMI2, else the scalar walk. DUOSERVE_CPU_QUANT_DECODE=scalar|expand|pairs|panel
// forces one at every token count (read per call; the tests run each): `pairs` and `panel` apply to
// int4 with bf16 inputs only (elsewhere the automatic choice runs), and a forced walk the CPU cannot
// run is an error, never silently replaced.
QDecode quant_decode(int bits, bool bf16_inputs, int64_t T) {
  const bool pairs_apply = bits == 4 && bf16_inputs;
  const char* v = std::getenv("DUOSERVE_CPU_QUANT_DECODE");
  if (v && *v) {
    if (std::strcmp(v, "scalar") == 0) return QDecode::kScalar;
    if (std::strcmp(v, "expand") == 0) {
      TORCH_CHECK(cpu_has_simd_decode(), "DUOSERVE_CPU_QUANT_DECODE=expand needs AVX-512 VBMI and VBMI2, which this CPU lacks");
      return QDecode::kExpand;
    }
    const bool panel = std::strcmp(v, "panel") == 0;
    TORCH_CHECK(panel || std::strcmp(v, "pairs") == 0,
                "DUOSERVE_CPU_QUANT_DECODE must be scalar, expand, pairs or panel, got '", v, "'");
    TORCH_CHECK(cpu_has_pair_decode(), "DUOSERVE_CPU_QUANT_DECODE=", v, " needs AVX-512 VBMI2 and BF16, which this CPU lacks");
    if (pairs_apply) return panel ? QDecode::kPanel : QDecode::kPairs;
  }
  if (pairs_apply && cpu_has_pair_decode()) return T >= QPANEL_MIN_TB ? QDecode::kPanel : QDecode::kPairs;
  return cpu_has_simd_decode() ? QDecode::kExpand : QDecode::kScalar;
}

// The columns active for some token (|x| > thr; NaN fails the comparison), increasing, and their
// masked inputs [A, T] in fp32, read from x [T, K] in its own dtype. Branch-free: every column is
// written and the count advances only for an active one (a branch on random activity mispredicts
// half the time and cost more than the rest of the scan).
template <typename X>
void active_columns(const X* x, int64_t T, int64_t K, float thr, std::vector<int32_t>& active, std::vector<float>& xc) {
  active.resize(K + 1);
  xc.resize((K + 1) * T);
  int64_t count = 0;
  for (int64_t c = 0; c < K; ++c) {
    bool any = false;
    for (int64_t t = 0; t < T; ++t) {
      const float v = static_cast<float>(x[t * K + c]);
      const bool on = std::fabs(v) > thr;
      xc[count * T + t] = on ? v : 0.0f;
      any |= on;
    }
    active[count] = static_cast<int32_t>(c);
    count += any;
  }
  active.resize(count);
  xc.resize(count * T);
}

at::Tensor linear_q_cpu(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& offsets,
                        const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& threshold,
                        const c10::optional<at::Tensor>& bias, int64_t n, int64_t k, int64_t bits,
                        int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [T, ", k, "]");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(group_size > 0, "group_size must be positive");
  const int64_t nb = (n + QR - 1) / QR, ng = (k + group_size - 1) / group_size;
  TORCH_CHECK(bitmap.scalar_type() == at::kInt && bitmap.is_contiguous() && bitmap.numel() == nb * k * QWORDS,
              "bitmap must be contiguous int32 [NB, K, 4]");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() && offsets.numel() == nb * k,
              "offsets must be contiguous int32 [NB, K]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 1, "codes must be uint8 1-D");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == nb * ng * QR,
              "scales must be contiguous float16 [NB, NG, R]");
  const int64_t T = x.size(0);
  const float thr = threshold.item<float>();
  const QDecode decode = quant_decode(static_cast<int>(bits), x.scalar_type() == at::kBFloat16, T);
  // Active columns (any token's |x| > thr; NaN fails the comparison) and their masked inputs: [A, T]
  // fp32, or the pair walks' bf16 pairs.
  std::vector<int32_t> active;
  std::vector<float> xc;
  QPairs pairs;
  std::vector<int64_t> chunk_ends;  // the panel walk's
  const at::Tensor xs = x.contiguous();
  if (decode == QDecode::kPanel) {
    chunk_ends = panel_inputs(reinterpret_cast<const uint16_t*>(xs.data_ptr<at::BFloat16>()), T, k, thr, group_size,
                              pairs, active);
  } else if (xs.scalar_type() == at::kBFloat16) {
    active_columns(xs.data_ptr<at::BFloat16>(), T, k, thr, active, xc);
  } else if (xs.scalar_type() == at::kHalf) {
    active_columns(xs.data_ptr<at::Half>(), T, k, thr, active, xc);
  } else {
    const at::Tensor xf = xs.to(at::kFloat);
    active_columns(xf.data_ptr<float>(), T, k, thr, active, xc);
  }
  // every row block writes all its rows for every token
  at::Tensor y = at::empty({T, n}, x.options().dtype(at::kFloat));
  if (T > 0 && n > 0) {
    QProblem p{bitmap.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), codes.data_ptr<uint8_t>(),
               scales.data_ptr<c10::Half>(), active.data(), static_cast<int64_t>(active.size()), xc.data(),
               T, k, n, ng, group_size, static_cast<int>(bits), y.data_ptr<float>()};
    // a task of about 256k weights, as the float walk
    const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, QR * k));
    if (decode == QDecode::kPairs) pairs = make_pairs(active, xc, T, group_size);
    at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
      float* scratch = nullptr;  // the panel walk's [T][QR] sums of a row block
      if (decode == QDecode::kPanel) {
        scratch = static_cast<float*>(std::aligned_alloc(64, T * QR * sizeof(float)));
        TORCH_CHECK(scratch, "out of memory for the int4 panel walk's scratch (", T, " tokens)");
      }
      for (int64_t rb = b0; rb < b1; ++rb) {
        if (decode == QDecode::kPanel) {
          walk_block_qpanel(p, pairs, chunk_ends, rb, scratch);
        } else if (decode == QDecode::kPairs) {
          walk_block_pairs(p, pairs, rb);
        } else if (decode == QDecode::kExpand) {
          if (p.bits == 8) walk_block_simd<8>(p, rb); else walk_block_simd<4>(p, rb);
        } else {
          if (p.bits == 8) walk_block<8>(p, rb); else walk_block<4>(p, rb);
        }
      }
      std::free(scratch);
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(duoserve, CPU, m) { m.impl("dual_sparse_linear_q", &linear_q_cpu); }
