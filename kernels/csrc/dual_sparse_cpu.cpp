// Native CPU kernels for the dual-sparse linear y = W @ where(|x| > t, x, 0) + bias.
//
// Layout (kernels/layout.py), R = 128 rows per row block, NB = ceil(N / R):
//   bitmap  int32 [NB, K, 4]   bit b of word w of (rb, k): W[rb*R + 32w + b, k] != 0
//   offsets int32 [NB, K]      first value of (rb, k)
//   values  bf16|fp32 [nnz+R]  non-zeros in (rb, k, row) order, R elements of zero padding
//
// spmspv (decode and small batches): the columns active for at least one token are compacted
// once per call; then, per row block (at::parallel_for), the kernel walks only those columns and
// expands each column's packed values into the R-row fp32 accumulators:
//   bf16: 4 x (64-byte unaligned load + vpexpandw under the 32-bit word) -> even/odd rows as fp32
//   fp32: 8 x (64-byte load + vexpandps under each 16-bit half word)
//   or, where the CPU has AVX-512 VPOPCNTDQ + BITALG and a one-time calibration measures it
//   faster (the "permute" decoder): each value's index among the packed ones is a popcount of the
//   mask bits below its row (vpopcntw for a bf16 word, then one vpermw gathers all 32 values;
//   vpopcntd + vpermd per 16 fp32 rows), and a masked shift / and / move zeroes the absent rows.
//   On the Zen 5 EPYC this project ran on 2026-11-27 a vpexpandw cost as much as ~3.7 FMAs and a
//   vpermw as one (scripts/simd_throughput.c), and the permute decoder walked 11008x4096 (bf16,
//   one token, weights from DRAM) in 2.2 ms against 6.6 ms.
// An inactive column costs no weight bytes and an active one costs its non-zeros plus 20
// bytes of index; the values of the column 48 active columns ahead are prefetched (the spans are
// too short and scattered for the hardware prefetchers), except that every column is walked when
// few are inactive and the spans are long (walk_all_columns). The AVX2 walk instead prefetches
// every line of the row block a few KiB ahead (ValuePrefetch: on the Zen 3 host it measured, a
// random half of the spans cost as much DRAM time as all of them, so one sequential stream is
// faster; the inactive columns are still not decoded). Tokens are processed in chunks of up
// to 3 (24 zmm accumulators), or, bf16 with the permute decoder, 4-12 in one pass over row slices
// (block_bf16_permute_slices); on CPUs with AVX512-BF16, batches of 5-256 tokens decode each chunk of
// columns once into an L1 panel and multiply it with vdpbf16ps (block_bf16_dot_panel). The AVX-512
// code is compiled with per-function target attributes and chosen at run time; x86-64 CPUs without
// AVX-512 take an AVX2 decoder (block_avx2: per mask byte a pshufb pattern for bf16, a vpermps
// index for fp32) and CPUs without AVX2 a scalar loop over set bits (same results up to fp32
// summation order).
//
// unpack_transposed (prefill): decompresses row blocks [rb0, rb1), with the walk's decoder, into a dense W^T tile
// [K, rows] so torch.matmul can run the large-batch product without a full dense copy.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t R = 128;
constexpr int64_t WORDS = R / 32;
constexpr int64_t MAX_TB = 3;  // tokens per pass: 3 x 8 accumulators fit 32 zmm registers

// On the loops over tokens and words inside the column walk. GCC 12 unrolls them completely
// anyway, but only after loop-invariant motion has run; until then the accumulator array is
// indexed by a variable, so its stores are not moved out of the column loop and every
// accumulator was written to the stack once per column (24 stores a column at 3 tokens: a batch
// of 3 took 1.6x as long as a batch of 2, now 1.1x). Unrolled early, the accumulators live in
// registers for the whole walk.
#define DS_UNROLL _Pragma("GCC unroll 16")  // every token loop (up to 12) unrolled in full

struct Problem {
  const int32_t* bitmap;   // [NB, K, WORDS]
  const int32_t* offsets;  // [NB, K]
  const void* values;      // [nnz + R]
  const int32_t* active;   // [A] active column indices, increasing
  int64_t n_active;        // A
  const float* xc;         // [A, T] masked inputs of the active columns, fp32
  int64_t T, K, N;
  float* y;                // [T, N] fp32 result
  // [T, pairs]: per token, the bf16 bits of active columns 2i (low half) and 2i + 1 (high half),
  // pairs = ceil(A / 2), for the panel walk (block_bf16_dot_panel); null when it does not run
  const uint32_t* xpairs = nullptr;
  int64_t pairs = 0;
  int64_t n_values = 0;  // elements of values: where the stream prefetch stops (0: no stream prefetch)
};

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

// Writes the fp32 accumulators of tokens [t0, t0 + tb) of row block rb: acc[t][row].
// Rows of row block rb that exist (R except in a last, partial block). Rows past them are never
// stored, so the walks skip the words / halves / slices that hold none (SmolLM2: N = 576 and 192
// leave a last block of 64 rows).
inline int64_t block_rows(const Problem& p, int64_t rb) { return std::min<int64_t>(R, p.N - rb * R); }

inline void store_block(const Problem& p, int64_t rb, int64_t t0, int64_t tb, const float* acc) {
  const int64_t rows = block_rows(p, rb);
  for (int64_t t = 0; t < tb; ++t)
    std::memcpy(p.y + (t0 + t) * p.N + rb * R, acc + t * R, rows * sizeof(float));
}

// ---- scalar path: any x86-64 (and the oracle for the SIMD path's indexing) ----
template <typename V>
void block_scalar(const Problem& p, int64_t rb, int64_t t0, int64_t tb) {
  std::vector<float> acc(R * tb, 0.f);  // [tb, R]
  const V* vals = static_cast<const V*>(p.values);
  for (int64_t j = 0; j < p.n_active; ++j) {
    const int64_t col = rb * p.K + p.active[j];
    const int32_t* words = p.bitmap + col * WORDS;
    const V* v = vals + p.offsets[col];
    const float* xj = p.xc + j * p.T + t0;
    for (int64_t w = 0; w < WORDS; ++w) {
      uint32_t m = static_cast<uint32_t>(words[w]);
      while (m) {
        const int64_t row = 32 * w + __builtin_ctz(m);
        float wv;
        if constexpr (std::is_same_v<V, uint16_t>) wv = bf16_to_float(*v++); else wv = *v++;
        for (int64_t t = 0; t < tb; ++t) acc[t * R + row] += wv * xj[t];
        m &= m - 1;
      }
    }
  }
  store_block(p, rb, t0, tb, acc.data());
}

// ---- AVX-512 path (F + BW + VBMI2 for vpexpandw) ----
#define DS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt")))

// Skipped columns leave gaps in the value stream that the hardware prefetchers do not follow,
// so the kernels prefetch the values of the column g_prefetch_ahead active columns ahead (past
// the end of a row block: the first columns of the next one): g_prefetch_lines > 0 prefetches
// that many 64-byte lines per 16-bit value width (branch-free; a 50%-dense bf16 column is 128
// bytes at any alignment, so 3 lines cover it), 0 prefetches exactly the column's lines (popcount;
// a data-dependent loop), and g_prefetch_ahead = 0 turns it off. Measured on the Zen 5 host
// (docs/kernels.md; bf16, p_w = p_x = 0.5, one token, weights from DRAM): with 48/3, 2.4-3.0x
// dense torch.matmul at the Llama-7B shapes; without any prefetch 0.8-1.0x. Walking all columns
// instead is about level with skipping there (2.3-2.8x).
//
// prefetch_column must be always_inline: GCC 12 treats a function whose only effect is
// __builtin_prefetch as pure, and when it is not inlined before that analysis (the early inliner
// declines it across the decoders' target attributes) the call, returning void, is deleted as
// dead code. Until 2026-11-27 that happened to every call here, so the kernels ran without any
// software prefetch; tests/kernels/test_cpu_settings.py now checks the built binary for prefetcht0.
int64_t g_prefetch_ahead = 48;
int64_t g_prefetch_lines = 3;
// The other kind of prefetch, the stream: every 64-byte line of the walked row blocks' values, the
// inactive columns' too, up to g_prefetch_stream bytes past the current column's values. It reads
// twice the lines at p_x = 0.5 but as one sequential stream, which is what the hardware serves
// fastest where skipped spans cost nearly as much as read ones: on the Zen 3 host (2026-11-29) reading
// a random half of 128-640-byte spans took 0.8-1.5x as long as reading all of them, mostly over 1
// (scripts/skip_bandwidth.c); the column-prefetching AVX2 walk took about as long as merely touching
// its lines (scripts/avx2_walk_memory.cpp), the streaming one 1.2x reading the whole weight in
// order; in alternated runs of the kernel (scripts/prefetch_ab.py; bf16, p_w 0.5, one
// token, from DRAM) the stream was level or 12-25% faster at p_x 0.5-0.7, level at 0.3
// (docs/reports/cpu-2026-11-29-zen3-stream). -1 (the default): the
// stream, 4096 bytes ahead, for the AVX2 walk (measured there) and the column prefetch for the
// AVX-512 walks (measured on Zen 4 / Zen 5 hosts, where skipping paid; the stream was never run
// there); 0: the column prefetch everywhere; > 0: the stream that far ahead everywhere. The walks of
// 4 or more tokens (slices, panel) always prefetch columns. g_prefetch_ahead = 0 turns both off.
// The AVX2 default streams only when at least kStreamMinActive of the columns are walked: with
// fewer the column prefetch reads so few lines that it wins (Zen 3, p_x = 0.9: medians of 5.3-6.0
// ms against 6.6-6.8 with the stream).
int64_t g_prefetch_stream = -1;
constexpr int64_t kAvx2StreamBytes = 4096;  // 1-16 KiB level within the Zen 3 host's noise
constexpr double kStreamMinActive = 0.15;
// When to walk every column instead of skipping the inactive ones: see walk_all_columns. Measured
// once per process (calibrate_walk_all) unless set (set_walk_all / DUOSERVE_CPU_WALK_ALL_*).
struct WalkAllPolicy {
  double max_inactive;  // a fraction of the columns
  double min_span;      // bytes of values per (row block, column), on average
};
bool g_walk_all_requested = false;
WalkAllPolicy g_walk_all_request{0.0, 0.0};

// HINT: _MM_HINT_T0 (into L1) for the walks; the panel walk fetches a chunk ahead into L2 (T1).
template <typename V, int HINT = _MM_HINT_T0>
__attribute__((always_inline)) inline void prefetch_column(const Problem& p, int64_t rb, int64_t j) {
  if (g_prefetch_ahead == 0) return;
  if (j >= p.n_active) {  // near the end of the row block: the start of the next one (walked next)
    j -= p.n_active;
    if (++rb * R >= p.N || j >= p.n_active) return;
  }
  const int64_t col = rb * p.K + p.active[j];
  const char* first = reinterpret_cast<const char*>(static_cast<const V*>(p.values) + p.offsets[col]);
  if (g_prefetch_lines > 0) {
    const int64_t lines = g_prefetch_lines * static_cast<int64_t>(sizeof(V)) / 2;
    for (int64_t i = 0; i < lines; ++i) _mm_prefetch(first + 64 * i, static_cast<_mm_hint>(HINT));
    return;
  }
  const int32_t* words = p.bitmap + col * WORDS;
  int64_t count = 0;
  for (int64_t w = 0; w < WORDS; ++w) count += __builtin_popcount(static_cast<uint32_t>(words[w]));
  const char* last = first + count * static_cast<int64_t>(sizeof(V));
  for (const char* line = first; line < last; line += 64) _mm_prefetch(line, static_cast<_mm_hint>(HINT));
}

// The stream distance a walk of `active` of K columns uses (0: the column prefetch): avx2_walk says
// which default applies.
inline int64_t stream_bytes(bool avx2_walk, int64_t active, int64_t K) {
  if (g_prefetch_ahead == 0) return 0;  // software prefetch off
  if (g_prefetch_stream >= 0) return g_prefetch_stream;
  return avx2_walk && static_cast<double>(active) >= kStreamMinActive * static_cast<double>(K) ? kAvx2StreamBytes : 0;
}

// The software prefetch of one walk over row block rb: call at(j, v) at each active column j whose
// values start at v. Always inline, for the reason given at prefetch_column.
template <typename V>
struct ValuePrefetch {
  const Problem& p;
  int64_t rb;
  int64_t stream;    // bytes ahead; 0: the column prefetch
  const char* next;  // the stream: the first line not yet prefetched
  const char* end;   // the stream: the end of the values

  __attribute__((always_inline)) ValuePrefetch(const Problem& p_, int64_t rb_, bool avx2_walk)
      : p(p_), rb(rb_), stream(p_.n_values > 0 ? stream_bytes(avx2_walk, p_.n_active, p_.K) : 0),
        next(nullptr), end(nullptr) {
    if (stream <= 0) return;
    const V* vals = static_cast<const V*>(p.values);
    // from the block's first value (the block before streamed into it; the lines fetched twice are
    // a few dozen of a block's thousands)
    next = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(vals + p.offsets[rb * p.K]) & ~uintptr_t{63});
    end = reinterpret_cast<const char*>(vals + p.n_values);
  }
  __attribute__((always_inline)) void at(int64_t j, const V* v) {
    if (stream > 0) {
      const char* want = std::min(reinterpret_cast<const char*>(v) + stream, end);
      for (; next < want; next += 64) _mm_prefetch(next, _MM_HINT_T0);
    } else {
      prefetch_column<V>(p, rb, j + g_prefetch_ahead);
    }
  }
};

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
int64_t g_bf16_dot_min_tb = 5;         // the panel walk from this many tokens (0: off)
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

DS_AVX512_DOT void block_bf16_dot_panel(const Problem& p, int64_t rb, float* out /* [T, R], zeroed */) {
  alignas(64) __m512i panel[PANEL_COLUMNS / 2 * 2 * WORDS];  // [pair][16-row group of the block]
  const uint16_t* vals = static_cast<const uint16_t*>(p.values);
  const __m512i pairs = below_pairs();
  const int halves = block_rows(p, rb) > 64 ? 2 : 1;  // those holding rows
  for (int64_t j0 = 0; j0 < p.n_active; j0 += PANEL_COLUMNS) {
    const int64_t j1 = std::min(p.n_active, j0 + PANEL_COLUMNS);
    for (int64_t j = j0; j < j1; j += 2) {
      const int64_t col0 = rb * p.K + p.active[j];
      const bool has1 = j + 1 < j1;
      const int64_t col1 = has1 ? rb * p.K + p.active[j + 1] : col0;
      const int32_t* w0 = p.bitmap + col0 * WORDS;
      const int32_t* w1 = p.bitmap + col1 * WORDS;
      const uint16_t* v0 = vals + p.offsets[col0];
      const uint16_t* v1 = vals + p.offsets[col1];
      if (j0 == 0) {  // later chunks were fetched while the one before was multiplied
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
    const int64_t n_pairs = (j1 - j0 + 1) / 2;
    const uint32_t* x = p.xpairs + j0 / 2;
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

bool cpu_has_avx2() {  // what DS_AVX2 enables
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("popcnt");
  return ok;
}

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
                         __builtin_cpu_supports("popcnt");
  return ok;
}

bool cpu_has_permute_isa() {  // what DS_AVX512_PERM enables
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq") &&
                         __builtin_cpu_supports("avx512bitalg") && __builtin_cpu_supports("popcnt");
  return ok;
}

// Whether torch's bf16 matmul is a real GEMM here: with AVX512-BF16 (and AMX, which comes with it)
// oneDNN multiplies bf16 natively; without it torch 2.13 ran bf16 at 9-10 GFLOP/s on a Zen 3 host
// at 1-384 tokens (4096x11008, one thread; fp32 64 at 384), so the tiled path computes in fp32.
bool cpu_has_fast_bf16_gemm() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

bool cpu_has_bf16_dot() {  // what DS_AVX512_DOT adds to DS_AVX512_PERM
  static const bool ok = cpu_has_permute_isa() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// How the spMspV walk turns a column's packed values into rows. Both SIMD decoders do the same
// fp32 operations in the same order per row, so they give bit-identical results; which one is
// faster depends on the CPU (vpexpandw's cost differs between microarchitectures), so unless one
// is requested the first call measures both (calibrate_decoder).
enum class Decoder : int64_t { kScalar = 0, kExpand = 1, kPermute = 2, kAvx2 = 3 };
int64_t g_decoder_request = -1;  // -1: measure; otherwise a Decoder

int64_t g_slices_max_tb = QUARTERS_MAX_TB;  // 0: passes of at most MAX_TB tokens only (for tests and benchmarks)

// One pass of TB (4..12) tokens over row slices: 64-row halves up to HALVES_MAX_TB, 32-row quarters above.
template <int TB>
void slices_block(const Problem& p, int64_t rb, int64_t t0) {
  block_bf16_permute_slices<TB, TB <= HALVES_MAX_TB ? 2 : 1>(p, rb, t0);
}

void run_slices(const Problem& p, int64_t rb, int64_t t0, int64_t tb) {
  switch (tb) {
    case 4: slices_block<4>(p, rb, t0); break;
    case 5: slices_block<5>(p, rb, t0); break;
    case 6: slices_block<6>(p, rb, t0); break;
    case 7: slices_block<7>(p, rb, t0); break;
    case 8: slices_block<8>(p, rb, t0); break;
    case 9: slices_block<9>(p, rb, t0); break;
    case 10: slices_block<10>(p, rb, t0); break;
    case 11: slices_block<11>(p, rb, t0); break;
    default: slices_block<12>(p, rb, t0); break;
  }
}

// Calls walk(TB, W) with TB = tb (1..3) and W = the words of block rb that hold rows (2 in a last
// block of at most 64 rows, 4 otherwise) as std::integral_constant: the walks' template arguments.
template <typename Walk>
void with_tokens_and_words(const Problem& p, int64_t rb, int64_t tb, Walk walk) {
  auto words = [&](auto t) {
    if (block_rows(p, rb) > 64)
      walk(t, std::integral_constant<int, WORDS>{});
    else
      walk(t, std::integral_constant<int, 2>{});
  };
  if (tb == 1)
    words(std::integral_constant<int, 1>{});
  else if (tb == 2)
    words(std::integral_constant<int, 2>{});
  else
    words(std::integral_constant<int, 3>{});
}

void run_block(const Problem& p, int64_t rb, bool bf16, Decoder d) {
  if (p.xpairs != nullptr) {  // spmspv set up the panel walk
    thread_local std::vector<float> scratch;
    scratch.assign(p.T * R + 16, 0.f);
    float* out = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t{63});
    block_bf16_dot_panel(p, rb, out);
    store_block(p, rb, 0, p.T, out);
    return;
  }
  for (int64_t t0 = 0, tb = 0; t0 < p.T; t0 += tb) {
    const int64_t left = p.T - t0;
    if (d == Decoder::kPermute && bf16 && g_slices_max_tb >= HALVES_MIN_TB && left >= HALVES_MIN_TB) {
      tb = std::min<int64_t>(left, g_slices_max_tb);
      run_slices(p, rb, t0, tb);
      continue;
    }
    tb = std::min<int64_t>(MAX_TB, left);
    if (d == Decoder::kScalar) {
      bf16 ? block_scalar<uint16_t>(p, rb, t0, tb) : block_scalar<float>(p, rb, t0, tb);
    } else if (d == Decoder::kPermute) {  // a block of at most 64 rows walks only its first two words
      with_tokens_and_words(p, rb, tb, [&](auto t, auto w) {
        constexpr int TB = decltype(t)::value, W = decltype(w)::value;
        bf16 ? block_bf16_permute<TB, W>(p, rb, t0) : block_f32_permute<TB, W>(p, rb, t0);
      });
    } else if (d == Decoder::kAvx2) {
      with_tokens_and_words(p, rb, tb, [&](auto t, auto w) {
        constexpr int TB = decltype(t)::value, W = decltype(w)::value;
        bf16 ? block_avx2<uint16_t, TB, W>(p, rb, t0) : block_avx2<float, TB, W>(p, rb, t0);
      });
    } else {  // the expand decoder
      with_tokens_and_words(p, rb, tb, [&](auto t, auto w) {
        constexpr int TB = decltype(t)::value, W = decltype(w)::value;
        bf16 ? block_bf16_avx512<TB, W>(p, rb, t0) : block_f32_avx512<TB, W>(p, rb, t0);
      });
    }
  }
}

bool decoder_available(Decoder d) {
  return d == Decoder::kScalar || (d == Decoder::kExpand && cpu_has_avx512()) ||
         (d == Decoder::kPermute && cpu_has_permute_isa()) || (d == Decoder::kAvx2 && cpu_has_avx2());
}

// Times both SIMD decoders on a synthetic problem that stays in cache (8 row blocks x 512
// columns at about 50% weight sparsity, one token, every column active; about 0.1 ms a pass): the walk
// is bound by decoding instructions in cache, which is where the decoders differ (from DRAM, with
// the prefetch, they were level on the Zen 5 host). Best of 7 passes each, alternating.
// A fixed xorshift stream: the calibrations measure the same problem every time.
struct Xorshift {
  uint64_t state;
  uint64_t next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
};

// The index of a synthetic weight for the calibrations: NB row blocks x K columns, about half of
// the bits set (p_w ~0.5: 64 values, 128 bytes of bf16, per row block and column).
struct SyntheticIndex {
  std::vector<int32_t> bitmap, offsets;
  int64_t nnz = 0;
};

SyntheticIndex synthetic_index(int64_t NB, int64_t K, Xorshift& rng) {
  SyntheticIndex s;
  s.bitmap.resize(NB * K * WORDS);
  s.offsets.resize(NB * K);
  for (int64_t c = 0; c < NB * K; ++c) {
    s.offsets[c] = static_cast<int32_t>(s.nnz);
    for (int64_t w = 0; w < WORDS; ++w) {
      const uint32_t word = static_cast<uint32_t>(rng.next() >> 16);
      s.bitmap[c * WORDS + w] = static_cast<int32_t>(word);
      s.nnz += __builtin_popcount(word);
    }
  }
  return s;
}

Decoder calibrate_decoder(bool bf16) {
  if (!cpu_has_permute_isa())
    return cpu_has_avx512() ? Decoder::kExpand : cpu_has_avx2() ? Decoder::kAvx2 : Decoder::kScalar;
  if (!cpu_has_avx512()) return Decoder::kPermute;
  constexpr int64_t NB = 8, K = 512;
  Xorshift rng{0x9E3779B97F4A7C15ull};
  const SyntheticIndex index = synthetic_index(NB, K, rng);
  std::vector<uint16_t> v16(bf16 ? index.nnz + R : 0, 0x3F80);  // 1.0
  std::vector<float> v32(bf16 ? 0 : index.nnz + R, 1.f);
  std::vector<int32_t> active(K);
  for (int64_t k = 0; k < K; ++k) active[k] = static_cast<int32_t>(k);
  std::vector<float> xc(K, 0.5f), y(NB * R);
  Problem p{index.bitmap.data(), index.offsets.data(), bf16 ? static_cast<const void*>(v16.data()) : v32.data(),
            active.data(), K, xc.data(), 1, K, NB * R, y.data()};
  p.n_values = index.nnz + R;
  double best[2] = {1e30, 1e30};
  const Decoder candidates[2] = {Decoder::kExpand, Decoder::kPermute};
  for (int pass = 0; pass < 7; ++pass)
    for (int i = 0; i < 2; ++i) {
      const auto start = std::chrono::steady_clock::now();
      for (int64_t rb = 0; rb < NB; ++rb) run_block(p, rb, bf16, candidates[i]);
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      best[i] = std::min(best[i], took.count());
    }
  return best[1] < best[0] ? Decoder::kPermute : Decoder::kExpand;
}

Decoder active_decoder(bool bf16) {
  if (g_decoder_request >= 0) return static_cast<Decoder>(g_decoder_request);
  static const Decoder measured_bf16 = calibrate_decoder(true);  // thread-safe, once per process
  static const Decoder measured_f32 = calibrate_decoder(false);
  return bf16 ? measured_bf16 : measured_f32;
}

void check_layout(const torch::Tensor& bitmap, const torch::Tensor& offsets, const torch::Tensor& values,
                  int64_t n, int64_t k) {
  const int64_t nb = (n + R - 1) / R;
  TORCH_CHECK(bitmap.dtype() == torch::kInt32 && bitmap.is_contiguous() && bitmap.dim() == 3 &&
                  bitmap.size(0) == nb && bitmap.size(1) == k && bitmap.size(2) == WORDS,
              "bitmap must be contiguous int32 [", nb, ", ", k, ", ", WORDS, "]");
  TORCH_CHECK(offsets.dtype() == torch::kInt32 && offsets.is_contiguous() && offsets.numel() == nb * k,
              "offsets must be contiguous int32 [", nb, ", ", k, "]");
  TORCH_CHECK(values.is_contiguous() && values.dim() == 1 && values.numel() >= R,
              "values must be contiguous 1-D with R elements of padding");
  TORCH_CHECK(bitmap.device().is_cpu() && offsets.device().is_cpu() && values.device().is_cpu(),
              "CPU kernel needs CPU tensors");
}

}  // namespace

// x [T, K] -> x with |x| <= threshold set to 0 (NaN inputs too), compared in fp32, in x's dtype.
// Branch-free on the raw bits: a prompt's activations fall on either side of the threshold at
// random, and the ATen expression (abs, to(float), >, where) or a loop with a branch per element
// ran at about 5 ns an element from mispredictions (390-520 us for a [64, 1536] bf16 prompt on the
// Zen 5 host, more than the GEMM it feeds; 0.5 ns without them).
template <typename Raw, typename Scalar>
void mask_bits(const Scalar* src, Scalar* dst, int64_t n, float t) {
  static_assert(sizeof(Raw) == sizeof(Scalar));
  for (int64_t i = 0; i < n; ++i) {
    Raw bits;
    std::memcpy(&bits, src + i, sizeof(Raw));
    const Raw keep = static_cast<Raw>(0) - static_cast<Raw>(std::fabs(static_cast<float>(src[i])) > t);
    bits &= keep;
    std::memcpy(dst + i, &bits, sizeof(Raw));
  }
}

torch::Tensor mask_input(const torch::Tensor& x_in, const torch::Tensor& threshold) {
  const float t = threshold.item<float>();
  const torch::Tensor x = x_in.contiguous();
  torch::Tensor out = torch::empty_like(x);
  const int64_t n = x.numel();
  switch (x.scalar_type()) {
    case torch::kBFloat16:
      mask_bits<uint16_t>(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), n, t);
      break;
    case torch::kHalf:
      mask_bits<uint16_t>(x.data_ptr<at::Half>(), out.data_ptr<at::Half>(), n, t);
      break;
    case torch::kFloat:
      mask_bits<uint32_t>(x.data_ptr<float>(), out.data_ptr<float>(), n, t);
      break;
    default:
      return torch::where(x.abs().to(torch::kFloat) > t, x, torch::zeros({}, x.options()));
  }
  return out;
}

// Which columns to walk. An inactive column is skipped (no byte of it read) unless fewer than
// max_inactive (a fraction) of the columns are inactive AND the weight's spans (values per row
// block and column) average more than min_span bytes; then every column is walked, the masked
// inputs contributing exact zeros. Why both (the skip-short-spans policy, Zen 5 host, one thread, weights
// from DRAM, docs/kernels.md "When to skip inactive columns"): a dense-ish span (bf16 at p_w <= 0.4,
// fp32 at p_w <= 0.5) streams at up to 85% of the copy bandwidth when every column is walked, and
// skipping a random 30-50% of them breaks that stream for less than it saves (7-28% slower than
// walking all, at 1-4 tokens); bf16 at p_w 0.5 (128-byte spans) walks at only ~60% of the copy
// bandwidth, so skipping is level or faster from 25% inactive. From ~70% inactive skipping wins at
// every density. Skipping pays only with the software prefetch above: without it (as the kernels
// ran until 2026-11-27, see prefetch_column) walking a random half was slower even at p_w 0.5.
//
// Which rule holds is a property of the memory system, so it is measured (calibrate_walk_all): on
// the Zen 4 host (2026-11-28, docs/kernels.md) skipping a random half of 128-byte spans took 1.3x as
// long as walking them all (the walk read 2x the bytes at 2.7x the rate), skipping 40-70% of the
// columns was slower than skipping 30% at p_w 0.6 (102-byte spans), and only at p_w 0.7 (77 bytes)
// did skipping win; so there the bf16 p_w 0.5 spans are walked, up to 75% inactive.
constexpr WalkAllPolicy kSkipShortSpans{0.6, 144.0};     // the Zen 5 host
constexpr WalkAllPolicy kWalkShortSpans{0.75, 112.0};    // the Zen 4 host
constexpr double kWalkAllMargin = 1.1;  // the walk must win by 10% to change the policy

struct WalkAllCalibration {
  double skip_s = 0.0, walk_s = 0.0;  // best pass of each, seconds (0: not measured)
  int64_t probe_bytes = 0;
  WalkAllPolicy policy = kSkipShortSpans;
};

// The L3 size this CPU reports in sysfs (one instance: what one core can fill), or 0. Not
// sysconf(_SC_LEVEL3_CACHE_SIZE): glibc gave 320 MiB on the project's VM, whose L3 is 32 MiB.
int64_t last_level_cache_bytes() {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    std::string size;
    if (!(level_file >> level) || level != 3 || !(size_file >> size) || size.empty()) continue;
    const char unit = size.back();
    const int64_t scale = unit == 'K' ? 1024 : unit == 'M' ? 1024 * 1024 : unit == 'G' ? int64_t{1} << 30 : 1;
    try {
      return std::stoll(scale == 1 ? size : size.substr(0, size.size() - 1)) * scale;
    } catch (const std::exception&) {
      return 0;
    }
  }
  return 0;
}

// Times the one-token bf16 walk over a synthetic weight at p_w 0.5 (128-byte spans, the case the
// two rules disagree on) larger than the last-level cache, skipping a random half of the columns
// against walking them all (the skipped half as zero inputs); best of 5 passes each, alternating,
// each pass with a new random half. About 0.2 s and a transient of 4x the L3 (64-512 MiB); where
// that cannot be allocated nothing is measured.
WalkAllCalibration measure_walk_all() {
  WalkAllCalibration c;
  const Decoder d = active_decoder(true);
  if (d == Decoder::kScalar) return c;  // the scalar walk is bound by decoding, not by DRAM
  const int64_t llc = last_level_cache_bytes();
  const int64_t target = std::clamp<int64_t>(4 * (llc > 0 ? llc : int64_t{32} << 20), int64_t{64} << 20,
                                             int64_t{512} << 20);
  constexpr int64_t K = 4096;
  const int64_t per_block = K * (WORDS * 4 + 4 + R);  // bitmap, offsets, ~64 bf16 values per column
  const int64_t NB = (target + per_block - 1) / per_block;
  Xorshift rng{0x2545F4914F6CDD1Dull};
  const SyntheticIndex index = synthetic_index(NB, K, rng);
  const std::vector<uint16_t> values(index.nnz + R, 0x3F80);  // 1.0
  c.probe_bytes = static_cast<int64_t>(index.bitmap.size() + index.offsets.size()) * 4 +
                  static_cast<int64_t>(values.size()) * 2;
  std::vector<int32_t> all(K), on;
  for (int64_t k = 0; k < K; ++k) all[k] = static_cast<int32_t>(k);
  std::vector<float> x_all(K), x_on, y(NB * R);
  double best[2] = {1e30, 1e30};  // skip, walk
  for (int pass = 0; pass < 5; ++pass) {
    on.clear();
    for (int64_t k = 0; k < K; ++k) {
      const bool active = rng.next() & 1;
      x_all[k] = active ? 1.f : 0.f;
      if (active) on.push_back(static_cast<int32_t>(k));
    }
    x_on.assign(on.size(), 1.f);
    for (int i = 0; i < 2; ++i) {
      const int which = (pass + i) % 2;  // alternate which policy goes first
      Problem p{index.bitmap.data(), index.offsets.data(), values.data(), which ? all.data() : on.data(),
                which ? K : static_cast<int64_t>(on.size()), which ? x_all.data() : x_on.data(),
                1, K, NB * R, y.data()};
      p.n_values = static_cast<int64_t>(values.size());
      const auto start = std::chrono::steady_clock::now();
      for (int64_t rb = 0; rb < NB; ++rb) run_block(p, rb, true, d);
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      best[which] = std::min(best[which], took.count());
    }
  }
  c.skip_s = best[0];
  c.walk_s = best[1];
  c.policy = best[0] > kWalkAllMargin * best[1] ? kWalkShortSpans : kSkipShortSpans;
  return c;
}

WalkAllCalibration calibrate_walk_all() {
  try {
    return measure_walk_all();
  } catch (const std::bad_alloc&) {
    return WalkAllCalibration{};  // the Zen 5 constants, unmeasured
  }
}

const WalkAllCalibration& walk_all_calibration() {
  static const WalkAllCalibration measured = calibrate_walk_all();  // thread-safe, once per process
  return measured;
}

WalkAllPolicy active_walk_all() {
  return g_walk_all_requested ? g_walk_all_request : walk_all_calibration().policy;
}

bool walk_all_columns(int64_t n_inactive, int64_t k, double mean_span_bytes) {
  if (n_inactive <= 0) return false;  // nothing to skip: both walks are the same (and nothing is measured)
  // Neither measured policy walks this many inactive columns: decide without measuring (a call that
  // does not stream, e.g. the AVX2 walk below kStreamMinActive active, never pays for the measurement)
  if (!g_walk_all_requested &&
      static_cast<double>(n_inactive) >= std::max(kSkipShortSpans.max_inactive, kWalkShortSpans.max_inactive) * k)
    return false;
  const WalkAllPolicy policy = active_walk_all();
  return static_cast<double>(n_inactive) < policy.max_inactive * k && mean_span_bytes > policy.min_span;
}

// spmspv's per-call passes over x, in AVX-512 where the CPU has it: spmspv itself is compiled for
// baseline x86-64, and its SSE2 loops over [T, K] cost half as much as the panel walk's products at
// 116 tokens of a 192x576 projection (perf, 2026-11-28; prefill is most of the token work under load).
// on[k] = whether any token's |x| is over the threshold (NaN never is); a chunk of 16 columns stops
// reading tokens once all 16 are on, which at 50% activation sparsity is after a few tokens.
inline __mmask16 first_lanes(int64_t n) {  // the first min(n, 16) of 16 lanes
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

DS_AVX512_PERM void active_columns_avx512(const float* x, int64_t T, int64_t K, float thr, uint8_t* on) {
  const __m512 limit = _mm512_set1_ps(thr);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 lanes = first_lanes(K - k);
    __mmask16 any = 0;
    for (int64_t t = 0; t < T && any != lanes; ++t)
      any |= _mm512_mask_cmp_ps_mask(lanes, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes, x + t * K + k)), limit, _CMP_GT_OQ);
    _mm_mask_storeu_epi8(on + k, lanes, _mm_maskz_mov_epi8(any, _mm_set1_epi8(1)));
  }
}

// The panel walk's inputs when every column is walked: per token, the masked bf16 bits of x's row
// (exact: x came from bf16), which, two to a 32-bit word, are the row's column pairs; a row of P
// words (out zeroed beforehand: the pad after an odd K stays 0).
DS_AVX512_PERM void masked_bf16_rows_avx512(const float* x, int64_t T, int64_t K, float thr, uint32_t* out, int64_t P) {
  const __m512 limit = _mm512_set1_ps(thr);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = x + t * K;
    uint16_t* dst = reinterpret_cast<uint16_t*>(out + t * P);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 lanes = first_lanes(K - k);
      const __m512 v = _mm512_maskz_loadu_ps(lanes, row + k);
      const __mmask16 keep = _mm512_mask_cmp_ps_mask(lanes, _mm512_abs_ps(v), limit, _CMP_GT_OQ);
      _mm256_mask_storeu_epi16(dst + k, lanes, _mm512_cvtepi32_epi16(_mm512_maskz_srli_epi32(keep, _mm512_castps_si512(v), 16)));
    }
  }
}

// Whether spmspv runs a bf16 call of T tokens with the panel walk (any T from the minimum: linear_cpu
// sends calls there only up to g_bf16_dot_max_tb). The panel has its own gather, so it runs whichever
// SIMD decoder the walk measured faster; a forced scalar decoder turns it off.
bool panel_enabled(int64_t T) {
  return g_bf16_dot_min_tb > 0 && T >= g_bf16_dot_min_tb && cpu_has_bf16_dot() &&
         active_decoder(true) != Decoder::kScalar;
}

torch::Tensor spmspv(const torch::Tensor& x_in, const torch::Tensor& bitmap, const torch::Tensor& offsets,
                     const torch::Tensor& values, const torch::Tensor& threshold,
                     const c10::optional<torch::Tensor>& bias, int64_t n, int64_t force_scalar) {
  TORCH_CHECK(x_in.dim() == 2, "x must be [T, K]");
  TORCH_CHECK(x_in.dtype() == values.dtype(), "x and values must have the same dtype");
  TORCH_CHECK(x_in.scalar_type() == torch::kBFloat16 || x_in.scalar_type() == torch::kFloat,
              "CPU kernel supports bf16 and fp32");
  const int64_t T = x_in.size(0), K = x_in.size(1);
  check_layout(bitmap, offsets, values, n, K);
  const float thr = threshold.item<float>();
  const torch::Tensor x = x_in.contiguous().to(torch::kFloat);  // [T, K] fp32

  // Active columns (any token over the threshold); token-major, so the loop reads x in order.
  const float* xp = x.data_ptr<float>();
  std::vector<uint8_t> on(K, 0);
  if (cpu_has_permute_isa() && !force_scalar) {
    active_columns_avx512(xp, T, K, thr, on.data());
  } else {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) on[k] |= std::fabs(xp[t * K + k]) > thr;  // NaN is never over
  }
  int64_t n_on = 0;
  for (int64_t k = 0; k < K; ++k) n_on += on[k];
  const int64_t nb = bitmap.size(0);
  const double mean_span =
      nb * K > 0 ? static_cast<double>(values.numel() - R) * values.element_size() / (nb * K) : 0.0;
  const bool bf16 = values.scalar_type() == torch::kBFloat16;
  const Decoder decoder = force_scalar ? Decoder::kScalar : active_decoder(bf16);
  // A walk that streams its row blocks (ValuePrefetch: the block walks of 1-3 tokens, and the AVX2
  // walk's passes at any count) reads every line whether it skips the inactive columns or not, so
  // walking them all would only add decoding: the measured policy does not apply (a requested one,
  // set_walk_all, still does).
  const bool streams = decoder != Decoder::kScalar && !(bf16 && panel_enabled(T)) &&
                       (T <= MAX_TB || decoder == Decoder::kAvx2) &&
                       stream_bytes(decoder == Decoder::kAvx2, n_on, K) > 0;
  const bool walk_all = (g_walk_all_requested || !streams) && walk_all_columns(K - n_on, K, mean_span);
  std::vector<int32_t> active;  // the walked columns
  active.reserve(walk_all ? K : n_on);
  for (int64_t k = 0; k < K; ++k)
    if (on[k] || walk_all) active.push_back(static_cast<int32_t>(k));
  const int64_t A = static_cast<int64_t>(active.size());

  torch::Tensor y = torch::zeros({T, n}, x.options());  // [T, N] fp32
  Problem p{bitmap.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), values.data_ptr(),
            active.data(), A, nullptr, T, K, n, y.data_ptr<float>()};
  p.n_values = values.numel();
  std::vector<float> xc;          // the walks' inputs, column-major [A, T]
  std::vector<uint32_t> xpairs;   // the panel's, token-major [T, ceil(A / 2)]
  if (bf16 && decoder != Decoder::kScalar && panel_enabled(T)) {
    // per token, the masked bf16 inputs of the active columns in order (exact: they came from
    // bf16), two to a 32-bit word, a zero column after an odd count
    const int64_t P = (A + 1) / 2;
    xpairs.assign(T * P, 0u);
    if (A == K) {  // every column walked (the rule past a few tokens): no gather
      masked_bf16_rows_avx512(xp, T, K, thr, xpairs.data(), P);
    } else {
      for (int64_t t = 0; t < T; ++t) {
        const float* row = xp + t * K;
        uint16_t* dst = reinterpret_cast<uint16_t*>(xpairs.data() + t * P);
        for (int64_t j = 0; j < A; ++j) {
          const float v = row[active[j]];
          uint32_t bits;
          std::memcpy(&bits, &v, 4);
          dst[j] = std::fabs(v) > thr ? static_cast<uint16_t>(bits >> 16) : 0;
        }
      }
    }
    p.xpairs = xpairs.data();
    p.pairs = P;
  } else {
    xc.resize(A * T);
    for (int64_t j = 0; j < A; ++j)
      for (int64_t t = 0; t < T; ++t) {
        const float v = xp[t * K + active[j]];
        xc[j * T + t] = std::fabs(v) > thr ? v : 0.f;
      }
    p.xc = xc.data();
  }
  // at least ~256k weights per task: smaller problems are not worth waking a second thread
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / (R * std::max<int64_t>(1, p.n_active)));
  if (p.n_active > 0)
    at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t rb = b0; rb < b1; ++rb) run_block(p, rb, bf16, decoder);
    });
  if (bias.has_value()) y.add_(bias->to(torch::kFloat));
  return y.to(x_in.scalar_type());
}

// Row blocks [rb0, rb1) -> dense W^T [K, (rb1 - rb0) * R] in the values' dtype.
torch::Tensor unpack_transposed(const torch::Tensor& bitmap, const torch::Tensor& offsets,
                                const torch::Tensor& values, int64_t rb0, int64_t rb1) {
  const int64_t nb = bitmap.size(0), K = bitmap.size(1);
  check_layout(bitmap, offsets, values, nb * R, K);
  TORCH_CHECK(0 <= rb0 && rb0 <= rb1 && rb1 <= nb, "row block range out of bounds");
  const int64_t cols = (rb1 - rb0) * R;
  torch::Tensor out = torch::empty({K, cols}, values.options());  // [K, rows]
  const int64_t esize = values.element_size();
  const char* vals = static_cast<const char*>(values.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  const int32_t* bm = bitmap.data_ptr<int32_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  // the walk's decoder for this element size (16-bit values of any type move the same way)
  const Decoder decoder = esize == 2 || esize == 4 ? active_decoder(esize == 2) : Decoder::kScalar;
  at::parallel_for(0, K, std::max<int64_t>(64, (1 << 18) / cols), [&](int64_t k0, int64_t k1) {
    if (decoder == Decoder::kPermute) return unpack_range_permute(bm, off, vals, o, K, cols, rb0, rb1, esize, k0, k1);
    if (decoder == Decoder::kExpand) return unpack_range_avx512(bm, off, vals, o, K, cols, rb0, rb1, esize, k0, k1);
    if (decoder == Decoder::kAvx2 && esize == 2) return unpack_range_avx2<uint16_t>(bm, off, vals, o, K, cols, rb0, rb1, k0, k1);
    if (decoder == Decoder::kAvx2) return unpack_range_avx2<float>(bm, off, vals, o, K, cols, rb0, rb1, k0, k1);
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t rb = rb0; rb < rb1; ++rb) {
        const int64_t col = rb * K + k;
        const char* v = vals + static_cast<int64_t>(off[col]) * esize;
        char* dst = o + (k * cols + (rb - rb0) * R) * esize;
        std::memset(dst, 0, R * esize);
        for (int64_t w = 0; w < WORDS; ++w) {
          uint32_t m = static_cast<uint32_t>(bm[col * WORDS + w]);
          while (m) {
            std::memcpy(dst + (32 * w + __builtin_ctz(m)) * esize, v, esize);
            v += esize;
            m &= m - 1;
          }
        }
      }
  });
  return out;
}

namespace {
// spmspv up to this many tokens, tiled GEMM above (measured: bench --cutover); -1: by decoder
// (sparse_max_tokens_for): 12 with the SIMD decoders, 3 with the scalar loop. The AVX2 decoder runs
// only on CPUs without AVX-512, where the tiled path multiplies in fp32 (cpu_has_fast_bf16_gemm): on
// a Zen 3 host its walk, in passes of 3 tokens, was faster than that up to 12 tokens at the Llama-7B
// MLP shapes and up to 16-32 at SmolLM2's (docs/kernels.md; forced on the Zen 4 host, where the
// tiled path's bf16 GEMM is native, the tiled path won from 4 tokens, not what such a CPU sees).
int64_t g_sparse_max_tokens = -1;
int64_t sparse_max_tokens_for(bool bf16) {
  if (g_sparse_max_tokens >= 0) return g_sparse_max_tokens;
  return active_decoder(bf16) == Decoder::kScalar ? 3 : 12;
}
// Decompressed W^T tile budget of the tiled path (bf16: 2 MiB, so a tile is still in L2/L3 when
// matmul reads it; and at least one row block). On the Zen 5 host, cold, T = 16 / 64, against
// 1 << 22: 11008x4096 7.4-7.7 ms instead of 10.9-11.0 (dense torch.matmul 6.8-7.1), 4096x11008
// level or better, the SmolLM2 shapes level; 1 << 18 (one row block per matmul there) cost the
// small shapes 50% in per-call overhead.
int64_t g_scratch_elements = 1 << 20;
}  // namespace

// Prefill / fp16 path: decompress row-block chunks of W^T (bounded scratch) and run at::matmul.
torch::Tensor tiled_linear(const torch::Tensor& x, const torch::Tensor& bitmap, const torch::Tensor& offsets,
                           const torch::Tensor& values, const torch::Tensor& threshold,
                           const c10::optional<torch::Tensor>& bias, int64_t n) {
  // fp16 GEMM on CPU is slow or missing: compute fp16 in fp32; so is bf16 GEMM on CPUs without
  // AVX512-BF16 (torch 2.13 on a Zen 3 host: about 9-10 GFLOP/s at any batch, fp32 55-64 at 64-384
  // tokens; docs/kernels.md)
  const bool fp32_compute = x.scalar_type() == torch::kHalf || (x.scalar_type() == torch::kBFloat16 && !cpu_has_fast_bf16_gemm());
  const auto cdt = fp32_compute ? torch::kFloat : x.scalar_type();
  const torch::Tensor xm = mask_input(x, threshold).to(cdt);  // [T, K]
  torch::Tensor y = torch::empty({x.size(0), n}, x.options().dtype(cdt));  // [T, N]
  const int64_t nb = bitmap.size(0), K = bitmap.size(1);
  const int64_t chunk = std::max<int64_t>(1, g_scratch_elements / (K * R));
  for (int64_t rb0 = 0; rb0 < nb; rb0 += chunk) {
    const int64_t rb1 = std::min(nb, rb0 + chunk);
    const int64_t r0 = rb0 * R, rows = std::min(n, rb1 * R) - r0;
    const torch::Tensor wt = unpack_transposed(bitmap, offsets, values, rb0, rb1).to(cdt);  // [K, rows]
    y.narrow(1, r0, rows).copy_(torch::matmul(xm, wt.narrow(1, 0, rows)));
  }
  if (bias.has_value()) y.add_(bias->to(cdt));
  return y.to(x.scalar_type());
}

// The CPU kernel of the duoserve::dual_sparse_linear op: x [T, K] -> y [T, N] in x's dtype.
torch::Tensor linear_cpu(const torch::Tensor& x, const torch::Tensor& bitmap, const torch::Tensor& offsets,
                         const torch::Tensor& values, const torch::Tensor& threshold,
                         const c10::optional<torch::Tensor>& bias, int64_t n, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [T, ", k, "]");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "x is ", x.scalar_type(), " but the weight is ",
              values.scalar_type());
  check_layout(bitmap, offsets, values, n, k);
  const bool sparse_dtype = x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat;
  if (sparse_dtype && x.size(0) <= sparse_max_tokens_for(x.scalar_type() == torch::kBFloat16))
    return spmspv(x, bitmap, offsets, values, threshold, bias, n, 0);
  if (x.scalar_type() == torch::kBFloat16 && x.size(0) <= g_bf16_dot_max_tb && panel_enabled(x.size(0)))
    return spmspv(x, bitmap, offsets, values, threshold, bias, n, 0);
  return tiled_linear(x.contiguous(), bitmap, offsets, values, threshold, bias, n);
}

void set_sparse_max_tokens(int64_t t) {  // -1: back to the decoder's default
  TORCH_CHECK(t >= -1, "sparse_max_tokens must be >= 0 (or -1 for the decoder's default), got ", t);
  g_sparse_max_tokens = t;
}
void set_slices_max_tokens(int64_t t) {
  TORCH_CHECK(t == 0 || (HALVES_MIN_TB <= t && t <= QUARTERS_MAX_TB), "tokens per one-pass slice walk: 0 (off) or ",
              HALVES_MIN_TB, "..", QUARTERS_MAX_TB);
  g_slices_max_tb = t;
}
int64_t get_slices_max_tokens() { return g_slices_max_tb; }
void set_bf16_dot_tokens(int64_t min_tb, int64_t max_tb) {
  TORCH_CHECK(min_tb == 0 || (1 <= min_tb && min_tb <= max_tb && max_tb <= 4096),
              "bf16 dot-product (panel) walk: min_tokens 0 (off) or 1 <= min_tokens <= max_tokens <= 4096, got ",
              min_tb, " and ", max_tb);
  g_bf16_dot_min_tb = min_tb;
  g_bf16_dot_max_tb = max_tb;
}
std::vector<int64_t> get_bf16_dot_tokens() { return {g_bf16_dot_min_tb, g_bf16_dot_max_tb}; }
void set_walk_all(double max_inactive, double min_span_bytes) {
  TORCH_CHECK(max_inactive >= 0 && min_span_bytes >= 0,
              "walk-all policy: the fraction inactive and the span in bytes must be >= 0, got ", max_inactive,
              " and ", min_span_bytes);
  g_walk_all_request = {max_inactive, min_span_bytes};
  g_walk_all_requested = true;
}
void reset_walk_all() { g_walk_all_requested = false; }
std::vector<double> get_walk_all() {
  const WalkAllPolicy policy = active_walk_all();
  return {policy.max_inactive, policy.min_span};
}
// [skip seconds, walk-all seconds, probe bytes, max_inactive, min_span] of the measurement (seconds 0
// where nothing was measured: the scalar decoder).
// [[max_inactive, min_span] of the skip-short-spans policy, the same of the walk-short-spans one]
std::vector<std::vector<double>> get_walk_all_policies() {
  return {{kSkipShortSpans.max_inactive, kSkipShortSpans.min_span},
          {kWalkShortSpans.max_inactive, kWalkShortSpans.min_span}};
}
std::vector<double> get_walk_all_calibration() {
  const WalkAllCalibration& c = walk_all_calibration();
  return {c.skip_s, c.walk_s, static_cast<double>(c.probe_bytes), c.policy.max_inactive, c.policy.min_span};
}
void set_prefetch(int64_t ahead, int64_t lines, int64_t stream) {
  TORCH_CHECK(ahead >= 0 && lines >= 0, "prefetch distance and lines must be >= 0 (0 distance turns it off), got ",
              ahead, " and ", lines);
  TORCH_CHECK(stream >= -1, "the stream prefetch distance must be -1 (each walk's default), 0 (prefetch columns) ",
              "or a number of bytes > 0, got ", stream);
  g_prefetch_ahead = ahead;
  g_prefetch_lines = lines;
  g_prefetch_stream = stream;
}
std::vector<int64_t> get_prefetch() { return {g_prefetch_ahead, g_prefetch_lines, g_prefetch_stream}; }
// What the 1-3 token walk of a dtype ("bf16" / "fp32") prefetches with the settings in use, when at
// least kStreamMinActive of the columns are active.
std::string prefetch_mode(const std::string& dtype) {
  TORCH_CHECK(dtype == "bf16" || dtype == "fp32", "dtype must be bf16 or fp32");
  const Decoder d = active_decoder(dtype == "bf16");
  if (g_prefetch_ahead == 0 || d == Decoder::kScalar) return "off";
  const int64_t stream = stream_bytes(d == Decoder::kAvx2, 1, 1);
  if (stream > 0)
    return "stream " + std::to_string(stream) + " B" +
           (g_prefetch_stream < 0 ? " (columns below " + std::to_string(static_cast<int>(kStreamMinActive * 100)) +
                                        "% active)" : std::string());
  return "columns " + std::to_string(g_prefetch_ahead) + "/" +
         (g_prefetch_lines > 0 ? std::to_string(g_prefetch_lines) : std::string("exact"));
}
int64_t get_sparse_max_tokens(const std::string& dtype) { return sparse_max_tokens_for(dtype == "bf16"); }

std::string isa() { return cpu_has_avx512() || cpu_has_permute_isa() ? "avx512" : cpu_has_avx2() ? "avx2" : "scalar"; }

const char* const kDecoderNames[] = {"scalar", "expand", "permute", "avx2"};
constexpr int64_t kDecoders = 4;

// "bf16" or "fp32" -> the decoder the spMspV walk uses for that dtype (measured on first use).
std::string decoder(const std::string& dtype) {
  TORCH_CHECK(dtype == "bf16" || dtype == "fp32", "dtype must be bf16 or fp32");
  return kDecoderNames[static_cast<int64_t>(active_decoder(dtype == "bf16"))];
}

// "" (measure, the default), "scalar", "expand" or "permute"; refuses one this CPU cannot run.
void set_decoder(const std::string& name) {
  if (name.empty()) { g_decoder_request = -1; return; }
  for (int64_t d = 0; d < kDecoders; ++d)
    if (name == kDecoderNames[d]) {
      TORCH_CHECK(decoder_available(static_cast<Decoder>(d)), "decoder '", name, "' needs instructions this CPU lacks (",
                  name == "expand" ? "AVX-512 VBMI2" : name == "permute" ? "AVX-512 VPOPCNTDQ" : "AVX2 + FMA", ")");
      g_decoder_request = d;
      return;
    }
  TORCH_CHECK(false, "unknown decoder '", name, "': use scalar, expand, permute, avx2 or an empty string");
}

std::vector<std::string> available_decoders() {
  std::vector<std::string> out;
  for (int64_t d = 0; d < kDecoders; ++d)
    if (decoder_available(static_cast<Decoder>(d))) out.push_back(kDecoderNames[d]);
  return out;
}

TORCH_LIBRARY_FRAGMENT(duoserve, m) {
  m.def("dual_sparse_linear(Tensor x, Tensor bitmap, Tensor offsets, Tensor values, Tensor threshold, "
        "Tensor? bias, int n, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(duoserve, CPU, m) { m.impl("dual_sparse_linear", &linear_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "duoserve dual-sparse linear CPU kernels (see kernels/csrc/dual_sparse_cpu.cpp)";
  m.def("spmspv", &spmspv, "y [T, N] = W @ where(|x| > t, x, 0) + bias on the packed layout",
        py::arg("x"), py::arg("bitmap"), py::arg("offsets"), py::arg("values"), py::arg("threshold"),
        py::arg("bias"), py::arg("n"), py::arg("force_scalar") = 0);
  m.def("unpack_transposed", &unpack_transposed, "row blocks [rb0, rb1) -> dense W^T [K, rows]");
  m.def("mask_input", &mask_input, "where(|x| > t, x, 0)");
  m.def("tiled_linear", &tiled_linear, "the prefill path (decompressed W^T tiles + matmul)");
  m.def("set_sparse_max_tokens", &set_sparse_max_tokens, "token count up to which spmspv is used");
  m.def("get_sparse_max_tokens", &get_sparse_max_tokens, "the cutover in use for 'bf16' or 'fp32'");
  m.def("set_slices_max_tokens", &set_slices_max_tokens,
        "bf16 permute walk: up to this many tokens (4..12) in one pass over row slices; 0 = passes of 3");
  m.def("get_slices_max_tokens", &get_slices_max_tokens);
  m.def("set_bf16_dot_tokens", &set_bf16_dot_tokens,
        "bf16 with AVX512-BF16: batches of min..max tokens take the vdpbf16ps panel walk (min 0 = off); "
        "larger batches the tiled path");
  m.def("get_bf16_dot_tokens", &get_bf16_dot_tokens, "[min_tokens, max_tokens] of the panel walk");
  m.def("has_fast_bf16_gemm", &cpu_has_fast_bf16_gemm,
        "whether the tiled path multiplies bf16 in bf16 (AVX512-BF16) rather than in fp32");
  m.def("has_bf16_dot", &cpu_has_bf16_dot, "whether this CPU can run the vdpbf16ps panel walk (AVX512-BF16, BMI2)");
  m.def("set_walk_all", &set_walk_all,
        "walk every column when fewer than max_inactive (a fraction) of them are inactive and the values "
        "per row block and column average more than min_span_bytes (max_inactive 0: always skip)");
  m.def("get_walk_all", &get_walk_all, "[max_inactive, min_span_bytes] of the walk-all policy in use");
  m.def("reset_walk_all", &reset_walk_all, "go back to the measured walk-all policy");
  m.def("get_walk_all_requested", []() { return g_walk_all_requested; },
        "whether the walk-all policy was set (set_walk_all) rather than measured");
  m.def("get_walk_all_policies", &get_walk_all_policies,
        "the two policies the measurement chooses between: [skip short spans, walk short spans]");
  m.def("get_walk_all_calibration", &get_walk_all_calibration,
        "[skip s, walk-all s, probe bytes, max_inactive, min_span_bytes] of the one-time measurement");
  m.def("walk_all_columns", &walk_all_columns, "the walk-all decision for (inactive columns, K, mean span bytes)");
  m.def("set_prefetch", &set_prefetch,
        "software prefetch: distance in active columns (0 = off), lines per column, stream bytes "
        "(-1: each walk's default, 0: columns, > 0: the stream that far ahead)");
  m.def("get_prefetch", &get_prefetch, "[distance, lines, stream] of the software prefetch");
  m.def("prefetch_mode", &prefetch_mode, "what the 1-3 token walk of 'bf16' / 'fp32' prefetches now");
  m.def("isa", &isa, "instruction set the spmspv kernel uses on this CPU");
  m.def("decoder", &decoder, "the spMspV decoder in use for a dtype ('bf16'/'fp32'), measured on first use");
  m.def("set_decoder", &set_decoder, "force a decoder (scalar, expand, permute) or '' to measure");
  m.def("available_decoders", &available_decoders, "the decoders this CPU can run");
}
