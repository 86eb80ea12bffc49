// The AVX-512 "expand" decoder (vpexpandw / vexpandps): its walks and its tile unpack.
// One part of the CPU kernel's single translation unit: dual_sparse_cpu.cpp includes them all.
#pragma once

#include "common.h"
#include "prefetch.h"

namespace {

// ---- AVX-512 path (F + BW + VBMI2 for vpexpandw) ----
#define DS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))

// W: the words of the block that hold rows (2 in a last block of at most 64 rows, 4 otherwise)
template <int TB, int W>
DS_AVX512 void block_bf16_avx512(const Problem& p, int64_t rb, int64_t t0) {
  __m512 acc[TB][W][2];  // [token][32-row chunk][even rows, odd rows]
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int c = 0; c < W; ++c) acc[t][c][0] = acc[t][c][1] = _mm512_setzero_ps();
  const uint16_t* vals = static_cast<const uint16_t*>(p.values);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
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
      // 32 packed bf16 -> their rows (zeros elsewhere); the padding makes the over-read safe
      const __m512i e = _mm512_maskz_expand_epi16(m, _mm512_loadu_si512(v));
      v += _mm_popcnt_u32(m);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(e, 16));  // rows 32c + 2i
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(e, high_half));  // rows 32c+2i+1
      DS_UNROLL for (int t = 0; t < TB; ++t) {
        acc[t][c][0] = _mm512_fmadd_ps(even, xb[t], acc[t][c][0]);
        acc[t][c][1] = _mm512_fmadd_ps(odd, xb[t], acc[t][c][1]);
      }
    }
  }
  alignas(64) float out[TB * R];  // rows past 32 W are not stored (store_block stops at N)
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int c = 0; c < W; ++c) {  // interleave even/odd lanes back into row order
      _mm512_store_ps(out + t * R + 32 * c, _mm512_permutex2var_ps(acc[t][c][0], lo_idx, acc[t][c][1]));
      _mm512_store_ps(out + t * R + 32 * c + 16, _mm512_permutex2var_ps(acc[t][c][0], hi_idx, acc[t][c][1]));
    }
  store_block(p, rb, t0, TB, out);
}

template <int TB, int W>
DS_AVX512 void block_f32_avx512(const Problem& p, int64_t rb, int64_t t0) {
  constexpr int CH = 2 * W;  // 16-row chunks
  __m512 acc[TB][CH];
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int c = 0; c < CH; ++c) acc[t][c] = _mm512_setzero_ps();
  const float* vals = static_cast<const float*>(p.values);
  ValuePrefetch<float> prefetch(p, rb, false);
  for (int64_t j = 0; j < p.n_active; ++j) {
    const int64_t col = rb * p.K + p.active[j];
    const int32_t* words = p.bitmap + col * WORDS;
    const float* v = vals + p.offsets[col];
    prefetch.at(j, v);
    __m512 xb[TB];
    DS_UNROLL for (int t = 0; t < TB; ++t) xb[t] = _mm512_set1_ps(p.xc[j * p.T + t0 + t]);
    DS_UNROLL for (int c = 0; c < CH; ++c) {
      const __mmask16 m = static_cast<__mmask16>(static_cast<uint32_t>(words[c / 2]) >> (16 * (c % 2)));
      const __m512 e = _mm512_maskz_expand_ps(m, _mm512_loadu_ps(v));
      v += _mm_popcnt_u32(m);
      DS_UNROLL for (int t = 0; t < TB; ++t) acc[t][c] = _mm512_fmadd_ps(e, xb[t], acc[t][c]);
    }
  }
  alignas(64) float out[TB * R];  // rows past 32 W are not stored (store_block stops at N)
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int c = 0; c < CH; ++c) _mm512_store_ps(out + t * R + 16 * c, acc[t][c]);
  store_block(p, rb, t0, TB, out);
}

// One (row block, column) slice -> R dense values at dst (zeros where absent).
DS_AVX512 inline const char* expand_column_avx512(const int32_t* words, const char* v, char* dst,
                                                  int64_t esize) {
  if (esize == 2) {
    DS_UNROLL for (int c = 0; c < WORDS; ++c) {
      const uint32_t m = static_cast<uint32_t>(words[c]);
      _mm512_storeu_si512(dst + 64 * c, _mm512_maskz_expand_epi16(m, _mm512_loadu_si512(v)));
      v += 2 * _mm_popcnt_u32(m);
    }
  } else {
    for (int c = 0; c < 2 * WORDS; ++c) {
      const __mmask16 m = static_cast<__mmask16>(static_cast<uint32_t>(words[c / 2]) >> (16 * (c % 2)));
      _mm512_storeu_ps(reinterpret_cast<float*>(dst) + 16 * c,
                       _mm512_maskz_expand_ps(m, _mm512_loadu_ps(reinterpret_cast<const float*>(v))));
      v += 4 * _mm_popcnt_u32(m);
    }
  }
  return v;
}

DS_AVX512 void unpack_range_avx512(const int32_t* bm, const int32_t* off, const char* vals, char* o,
                                   int64_t K, int64_t cols, int64_t rb0, int64_t rb1, int64_t esize,
                                   int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; ++k)
    for (int64_t rb = rb0; rb < rb1; ++rb) {
      const int64_t col = rb * K + k;
      expand_column_avx512(bm + col * WORDS, vals + static_cast<int64_t>(off[col]) * esize,
                           o + (k * cols + (rb - rb0) * R) * esize, esize);
    }
}

}  // namespace
