// The AVX2 decoder (CPUs without AVX-512): its walk and its tile unpack.
// One part of the CPU kernel's single translation unit: dual_sparse_cpu.cpp includes them all.
#pragma once

#include "common.h"
#include "prefetch.h"

namespace {

// ---- AVX2 path (AVX2 + FMA, no AVX-512: e.g. AMD Zen 2/3, Intel client CPUs) ----
// One byte of a word's mask (8 rows) selects a pattern from a 256-entry table that moves its packed
// values to their rows and zeroes the absent ones. The walk, bf16: the byte's 16 packed bytes
// broadcast to both 128-bit lanes and one vpshufb give 8 fp32 rows (a 16-byte pshufb, a widen and a
// shift before 2026-11-29: 5-7% slower on a Zen 3 host, in cache); fp32: one 32-byte load, a vpermps
// and a blend. The tile unpack keeps 16-bit values 16-bit (one pshufb per 8 rows). Without this
// decoder such CPUs ran the scalar loop over set bits (0.5-0.8x dense at one token, forced on the
// Zen 4 host; 0.1x at four), and until 2026-11-29 fp32 still did (3.6-6.3x slower than this on the
// Zen 3 host).
#define DS_AVX2 __attribute__((target("avx2,fma,popcnt")))

struct Bf16ByteShuffles {
  alignas(16) uint8_t pattern[256][16];
  Bf16ByteShuffles() {
    for (int m = 0; m < 256; ++m)
      for (int i = 0, k = 0; i < 8; ++i) {
        const bool present = (m >> i) & 1;
        pattern[m][2 * i] = present ? static_cast<uint8_t>(2 * k) : 0x80;      // 0x80: pshufb writes 0
        pattern[m][2 * i + 1] = present ? static_cast<uint8_t>(2 * k + 1) : 0x80;
        k += present;
      }
  }
};
const Bf16ByteShuffles& bf16_byte_shuffles() {
  static const Bf16ByteShuffles table;
  return table;
}

// The bf16 walk's patterns: per mask byte, a 32-byte vpshufb pattern for the byte's 16 packed bytes
// broadcast to both 128-bit lanes that puts each present row's bf16 in the high half of its fp32
// lane (rows 0-3 in the low lane, 4-7 in the high one) and zeroes the rest: 8 fp32 rows from one
// load and one shuffle (the 16-bit patterns above need a widen and a shift on top).
struct Bf16ByteToF32Shuffles {
  alignas(32) uint8_t pattern[256][32];
  Bf16ByteToF32Shuffles() {
    for (int m = 0; m < 256; ++m)
      for (int i = 0, k = 0; i < 8; ++i) {
        const bool present = (m >> i) & 1;
        uint8_t* lane = pattern[m] + 16 * (i / 4) + 4 * (i % 4);
        lane[0] = lane[1] = 0x80;  // the fp32's low 16 bits: zero
        lane[2] = present ? static_cast<uint8_t>(2 * k) : 0x80;
        lane[3] = present ? static_cast<uint8_t>(2 * k + 1) : 0x80;
        k += present;
      }
  }
};
const Bf16ByteToF32Shuffles& bf16_byte_to_f32_shuffles() {
  static const Bf16ByteToF32Shuffles table;
  return table;
}

// Per mask byte, lane i: the position of row i among the byte's packed fp32 values in the low 3 bits
// (all vpermps reads) and the sign bit set where row i is present (what vblendvps reads), so one
// 32-byte entry serves both instructions.
struct F32ByteIndices {
  alignas(32) int32_t index[256][8];
  F32ByteIndices() {
    for (int m = 0; m < 256; ++m)
      for (int i = 0, k = 0; i < 8; ++i) {
        const bool present = (m >> i) & 1;
        index[m][i] = present ? static_cast<int32_t>(static_cast<uint32_t>(k) | 0x80000000u) : 0;
        k += present;
      }
  }
};
const F32ByteIndices& f32_byte_indices() {
  static const F32ByteIndices table;
  return table;
}

// The per-mask-byte tables for values of type T: the vpermps indices for fp32; for 16-bit values
// the patterns that widen them to fp32 rows (WIDEN: the walk) or keep them 16-bit (the tile unpack).
template <typename T, bool WIDEN>
const auto& avx2_tables() {
  if constexpr (std::is_same_v<T, float>)
    return f32_byte_indices();
  else if constexpr (WIDEN)
    return bf16_byte_to_f32_shuffles();
  else
    return bf16_byte_shuffles();
}

// The 32 rows of one mask word -> 4 x 8 bf16 in row order (zeros where absent); each group's start
// comes from the word's (independent popcounts rather than a chain through the pointer). The
// padding after the last value makes the 16-byte over-reads safe.
DS_AVX2 inline void expand_word_bf16(uint32_t m, const uint16_t* v, const Bf16ByteShuffles& shuffles,
                                     __m128i rows[4]) {
  DS_UNROLL for (int g = 0; g < 4; ++g) {
    const uint32_t below = g == 0 ? 0u : _mm_popcnt_u32(m & ((1u << (8 * g)) - 1u));
    rows[g] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + below)),
                               _mm_load_si128(reinterpret_cast<const __m128i*>(shuffles.pattern[(m >> (8 * g)) & 0xFFu])));
  }
}

// The same for fp32 values: 4 x 8 fp32 rows (the padding covers the 32-byte over-reads too).
DS_AVX2 inline void expand_word_f32(uint32_t m, const float* v, const F32ByteIndices& indices, __m256 rows[4]) {
  DS_UNROLL for (int g = 0; g < 4; ++g) {
    const uint32_t below = g == 0 ? 0u : _mm_popcnt_u32(m & ((1u << (8 * g)) - 1u));
    const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(indices.index[(m >> (8 * g)) & 0xFFu]));
    rows[g] = _mm256_blendv_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(_mm256_loadu_ps(v + below), index),
                               _mm256_castsi256_ps(index));
  }
}

// The 32 rows of one mask word, bf16 values -> 4 x 8 fp32 rows (the 16-byte over-reads as above).
DS_AVX2 inline void expand_word_bf16_to_f32(uint32_t m, const uint16_t* v, const Bf16ByteToF32Shuffles& shuffles,
                                            __m256 rows[4]) {
  DS_UNROLL for (int g = 0; g < 4; ++g) {
    const uint32_t below = g == 0 ? 0u : _mm_popcnt_u32(m & ((1u << (8 * g)) - 1u));
    const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + below)));
    rows[g] = _mm256_castsi256_ps(_mm256_shuffle_epi8(
        packed, _mm256_load_si256(reinterpret_cast<const __m256i*>(shuffles.pattern[(m >> (8 * g)) & 0xFFu]))));
  }
}

// One word's 32 rows as 4 x 8 fp32, from either value type.
template <typename T, typename Tables>
DS_AVX2 inline void word_rows_f32(uint32_t m, const T* v, const Tables& tables, __m256 f[4]) {
  if constexpr (std::is_same_v<T, float>)
    expand_word_f32(m, v, tables, f);
  else
    expand_word_bf16_to_f32(m, v, tables, f);
}

// TB (1..3) tokens, W words (2 in a last block of at most 64 rows, 4 otherwise), one pass over the
// active columns: 4 W TB ymm accumulators, more than the 16 registers from one token on, but the
// spills (L1 round trips) cost less than walking the columns once per 64- or 32-row slice (which
// re-reads each column's values from L2 or further): Zen 4, forced, 11008x4096 from DRAM at one
// token 6.1-6.4 ms in 64-row halves, 4.5-4.9 ms in one pass (docs/kernels.md).
template <typename T, int TB, int W>
DS_AVX2 void block_avx2(const Problem& p, int64_t rb, int64_t t0) {
  const auto& tables = avx2_tables<T, true>();
  const T* vals = static_cast<const T*>(p.values);
  __m256 acc[TB][W][4];  // [token][32-row word][8-row group]
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int c = 0; c < W; ++c)
      for (int g = 0; g < 4; ++g) acc[t][c][g] = _mm256_setzero_ps();
  ValuePrefetch<T> prefetch(p, rb, true);
  for (int64_t j = 0; j < p.n_active; ++j) {
    const int64_t col = rb * p.K + p.active[j];
    const int32_t* words = p.bitmap + col * WORDS;
    const T* v = vals + p.offsets[col];
    prefetch.at(j, v);
    __m256 xb[TB];
    DS_UNROLL for (int t = 0; t < TB; ++t) xb[t] = _mm256_set1_ps(p.xc[j * p.T + t0 + t]);
    DS_UNROLL for (int c = 0; c < W; ++c) {
      const uint32_t m = static_cast<uint32_t>(words[c]);
      __m256 f[4];
      word_rows_f32(m, v, tables, f);
      v += _mm_popcnt_u32(m);
      DS_UNROLL for (int g = 0; g < 4; ++g)
        DS_UNROLL for (int t = 0; t < TB; ++t) acc[t][c][g] = _mm256_fmadd_ps(f[g], xb[t], acc[t][c][g]);
    }
  }
  alignas(32) float out[TB * R];  // rows past 32 W are not stored (store_block stops at N)
  DS_UNROLL for (int t = 0; t < TB; ++t)
    for (int c = 0; c < W; ++c)
      for (int g = 0; g < 4; ++g) _mm256_store_ps(out + t * R + 32 * c + 8 * g, acc[t][c][g]);
  store_block(p, rb, t0, TB, out);
}

// The AVX2 version of expand_column_avx512: 16-bit values (any 16-bit type moves the same way) or fp32.
template <typename T>
DS_AVX2 void unpack_range_avx2(const int32_t* bm, const int32_t* off, const char* vals, char* o,
                               int64_t K, int64_t cols, int64_t rb0, int64_t rb1, int64_t k0, int64_t k1) {
  const auto& tables = avx2_tables<T, false>();
  for (int64_t k = k0; k < k1; ++k)
    for (int64_t rb = rb0; rb < rb1; ++rb) {
      const int64_t col = rb * K + k;
      const T* v = reinterpret_cast<const T*>(vals) + off[col];
      T* dst = reinterpret_cast<T*>(o) + k * cols + (rb - rb0) * R;
      for (int c = 0; c < WORDS; ++c) {
        const uint32_t m = static_cast<uint32_t>(bm[col * WORDS + c]);
        if constexpr (std::is_same_v<T, float>) {
          __m256 rows[4];
          expand_word_f32(m, v, tables, rows);
          for (int g = 0; g < 4; ++g) _mm256_storeu_ps(dst + 32 * c + 8 * g, rows[g]);
        } else {
          __m128i rows[4];
          expand_word_bf16(m, v, tables, rows);
          for (int g = 0; g < 4; ++g) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32 * c + 8 * g), rows[g]);
        }
        v += _mm_popcnt_u32(m);
      }
    }
}

}  // namespace
