// How much of the AVX2 walk's time (bf16, one token) is memory: a self-contained model of the
// kernel's walk over a synthetic packed weight (kernels/csrc/decode_avx2.h: R = 128 rows per
// row block, a 4-word bitmap, offsets and packed bf16 values per (row block, column), about half the
// bits set), weights from DRAM (each call on the next of several copies), one thread. The walks
// (and touches) over the same active columns (a random 1 - PX of them), alternated, each first in turn:
//   walk-columns   the kernel's decode, prefetching the column 48 active columns ahead (3 lines of
//                  values and its bitmap words)
//   touch-columns  the same index reads and prefetch, one load per value line, no decoding
//   walk-stream    the kernel's decode, prefetching every line of the row block's values 4 KiB
//                  ahead of the current column (the inactive columns' lines too)
//   touch-stream   every line of every row block's values and bitmap read in order, nothing else
//   walk-super     a candidate layout: the values and bitmap of SB row blocks (a "superblock", SB=64
//                  in the environment) stored in (column, row block) order, so an active column is
//                  one span of ~SB x 144 bytes and an inactive one a gap as long; per active column
//                  the kernel's decode over the SB row blocks, accumulating in an L1 buffer
//   touch-super    the same spans of the active columns read line by line, nothing else
//   walk-super-pf  walk-super prefetching the next active columns' spans SPD bytes ahead (4096)
//   walk-columns-nobits  walk-columns without prefetching the bitmap words (the kernel before
//                  2026-11-29's third session)
// If walk-columns ~ touch-columns, the walk waits on memory, not on decoding.
//
//   g++ -O2 -std=c++17 -o /tmp/avx2_walk_memory scripts/avx2_walk_memory.cpp
//   PX=0.5 SB=64 SPD=4096 taskset -c 1 /tmp/avx2_walk_memory 11008 4096 8 40     # N K copies rounds
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {
constexpr int64_t R = 128, WORDS = 4, AHEAD = 48, LINES = 3, STREAM = 4096;
#define AVX2 __attribute__((target("avx2,fma,popcnt")))

struct Xorshift {
  uint64_t s;
  uint64_t next() { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s; }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
};

struct Weight { std::vector<int32_t> bitmap, offsets; std::vector<uint16_t> values; };
int64_t SB = 64;  // row blocks per superblock (env SB, at most kMaxSB)
constexpr int64_t kMaxSB = 64;
int64_t SPD = 4096;  // walk-super-pf: bytes of the next active spans kept prefetched (env SPD)


struct Walk {
  const Weight* w; const int32_t* active; int64_t n_active; const float* x; int64_t K, NB; float* y;
  const int32_t* bitmap() const { return w->bitmap.data(); }
  const uint16_t* values() const { return w->values.data(); }
};

struct Patterns {  // per mask byte: the vpshufb pattern that puts 8 packed bf16 into fp32 rows
  alignas(32) uint8_t p[256][32];
  Patterns() {
    for (int m = 0; m < 256; ++m)
      for (int i = 0, k = 0; i < 8; ++i) {
        const bool present = (m >> i) & 1;
        uint8_t* lane = p[m] + 16 * (i / 4) + 4 * (i % 4);
        lane[0] = lane[1] = 0x80;
        lane[2] = present ? 2 * k : 0x80;
        lane[3] = present ? 2 * k + 1 : 0x80;
        k += present;
      }
  }
};
const Patterns patterns;

// The kernel's AVX2 decode of rows 8g..8g+7 of a 32-row word with mask m whose packed values start
// at v: 8 fp32 rows, 0 where absent.
__attribute__((always_inline)) AVX2 inline __m256 group_rows(uint32_t m, int g, const uint16_t* v) {
  const uint32_t below = g == 0 ? 0u : _mm_popcnt_u32(m & ((1u << (8 * g)) - 1u));
  const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + below)));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(
      packed, _mm256_load_si256(reinterpret_cast<const __m256i*>(patterns.p[(m >> (8 * g)) & 0xFF]))));
}

// always_inline: GCC deletes an out-of-line function whose only effect is a prefetch (see
// prefetch_column in kernels/csrc/prefetch.h); without it both column walks ran unprefetched.
// BITS: also the column's bitmap words, as the kernel does since 2026-11-29 (without them, at p_x 0.9
// the column walk took 1.8-2.0x as long as touching its value lines: each column's words missed in turn).
template <bool BITS = true>
__attribute__((always_inline)) inline void prefetch_column(const Walk& w, int64_t rb, int64_t j) {
  if (j >= w.n_active) { j -= w.n_active; if (++rb >= w.NB || j >= w.n_active) return; }
  if (BITS) _mm_prefetch(reinterpret_cast<const char*>(w.bitmap() + (rb * w.K + w.active[j]) * WORDS), _MM_HINT_T0);
  const char* first = reinterpret_cast<const char*>(w.values() + w.w->offsets[rb * w.K + w.active[j]]);
  for (int i = 0; i < LINES; ++i) _mm_prefetch(first + 64 * i, _MM_HINT_T0);
}

template <bool STREAMED, bool BITS = true>
AVX2 void walk(const Walk& w, int64_t rb) {
  __m256 acc[4][4];
  for (auto& word : acc) for (auto& a : word) a = _mm256_setzero_ps();
  const char* next = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(w.values() + w.w->offsets[rb * w.K]) & ~uintptr_t{63});
  const char* end = reinterpret_cast<const char*>(w.values() + w.w->values.size());
  for (int64_t j = 0; j < w.n_active; ++j) {
    const int64_t col = rb * w.K + w.active[j];
    const int32_t* words = w.bitmap() + col * WORDS;
    const uint16_t* v = w.values() + w.w->offsets[col];
    if (STREAMED) {
      const char* want = std::min(reinterpret_cast<const char*>(v) + STREAM, end);
      for (; next < want; next += 64) _mm_prefetch(next, _MM_HINT_T0);
    } else {
      prefetch_column<BITS>(w, rb, j + AHEAD);
    }
    const __m256 xb = _mm256_set1_ps(w.x[j]);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const uint32_t m = static_cast<uint32_t>(words[c]);
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        acc[c][g] = _mm256_fmadd_ps(group_rows(m, g, v), xb, acc[c][g]);
      }
      v += _mm_popcnt_u32(m);
    }
  }
  for (int c = 0; c < 4; ++c)
    for (int g = 0; g < 4; ++g) _mm256_storeu_ps(w.y + rb * R + 32 * c + 8 * g, acc[c][g]);
}

AVX2 void touch_columns(const Walk& w, int64_t rb) {
  __m256i sum = _mm256_setzero_si256();
  for (int64_t j = 0; j < w.n_active; ++j) {
    const int64_t col = rb * w.K + w.active[j];
    const int32_t* words = w.bitmap() + col * WORDS;
    prefetch_column(w, rb, j + AHEAD);
    const int n = _mm_popcnt_u32(words[0]) + _mm_popcnt_u32(words[1]) + _mm_popcnt_u32(words[2]) + _mm_popcnt_u32(words[3]);
    const char* first = reinterpret_cast<const char*>(w.values() + w.w->offsets[col]);
    for (const char* q = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(first) & ~uintptr_t{63}); q < first + 2 * n; q += 64)
      sum = _mm256_add_epi32(sum, _mm256_load_si256(reinterpret_cast<const __m256i*>(q)));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.y + rb * R), sum);
}

AVX2 void touch_stream(const Walk& w, int64_t rb) {
  __m256i sum = _mm256_setzero_si256();
  const char* first = reinterpret_cast<const char*>(w.values() + w.w->offsets[rb * w.K]);
  const char* last = reinterpret_cast<const char*>(w.values() + w.w->offsets[rb * w.K + w.K - 1]) + 2 * R;
  for (const char* q = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(first) & ~uintptr_t{63}); q < last; q += 64)
    sum = _mm256_add_epi32(sum, _mm256_load_si256(reinterpret_cast<const __m256i*>(q)));
  const char* bits = reinterpret_cast<const char*>(w.bitmap() + rb * w.K * WORDS);
  for (int64_t i = 0; i < w.K * WORDS * 4; i += 64)
    sum = _mm256_add_epi32(sum, _mm256_load_si256(reinterpret_cast<const __m256i*>(bits + i)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.y + rb * R), sum);
}

// The same weight with each superblock's values in (column, row block) order: a column's spans of
// the SB row blocks are one contiguous run, and so are their bitmap words (with the kernel's
// bitmap order, [row block, column], the strided word reads cost more than skipping saved).
// Offsets still index each (row block, column).
Weight superblock_order(const Weight& a, int64_t NB, int64_t K) {
  Weight b; b.bitmap = a.bitmap; b.offsets.resize(NB * K); b.values.resize(a.values.size());
  int64_t at = 0;
  for (int64_t sb = 0; sb * SB < NB; ++sb)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t rb = sb * SB; rb < std::min(NB, (sb + 1) * SB); ++rb) {
        const int64_t col = rb * K + k;
        const int64_t n = (col + 1 < NB * K ? a.offsets[col + 1] : (int64_t)a.values.size() - R) - a.offsets[col];
        b.offsets[col] = static_cast<int32_t>(at);
        for (int i = 0; i < WORDS; ++i) b.bitmap[(sb * SB * K + k * std::min(SB, NB - sb * SB) + rb - sb * SB) * WORDS + i] = a.bitmap[col * WORDS + i];
        std::memcpy(&b.values[at], &a.values[a.offsets[col]], 2 * n);
        at += n;
      }
  return b;
}

// One superblock: for each active column, its SB spans in order, accumulating in an L1 buffer
// (R x SB fp32: 32 KiB at SB 64, Zen 3's whole L1d; the loads and stores of it are the cost).
template <bool PF>
AVX2 void walk_super(const Walk& w, int64_t sb) {
  alignas(64) static float acc[kMaxSB * R];
  const int64_t rb0 = sb * SB, rb1 = std::min(w.NB, rb0 + SB), nrb = rb1 - rb0;
  std::memset(acc, 0, sizeof(float) * R * nrb);
  // In superblock order column k's span runs from (rb0, k) to (rb0, k + 1), in bytes:
  const int32_t* offs = w.w->offsets.data() + rb0 * w.K;
  const int64_t sb_end = rb1 < w.NB ? w.w->offsets[rb1 * w.K] : static_cast<int64_t>(w.w->values.size()) - R;
  auto span_begin = [&](int64_t j) { return 2 * int64_t{offs[w.active[j]]}; };
  auto span_end = [&](int64_t j) { return 2 * (w.active[j] + 1 < w.K ? int64_t{offs[w.active[j] + 1]} : sb_end); };
  // PF: a cursor (active column pj, byte pq) over the spans of the columns after the current
  // one keeps SPD bytes of them prefetched, so that no span starts cold.
  int64_t pj = 0, pq = 0, ahead = 0;
  const char* base = reinterpret_cast<const char*>(w.values());
  for (int64_t j = 0; j < w.n_active; ++j) {
    const int64_t k = w.active[j];
    const uint16_t* v = w.values() + offs[k];
    if (PF) {
      ahead -= span_end(j) - span_begin(j);
      if (pj <= j) { pj = j + 1; pq = pj < w.n_active ? span_begin(pj) : 0; ahead = 0; }
      while (ahead < SPD && pj < w.n_active) {
        if (pq >= span_end(pj)) { if (++pj < w.n_active) pq = span_begin(pj); continue; }
        _mm_prefetch(base + pq, _MM_HINT_T0);
        pq += 64;
        ahead += 64;
      }
    }
    const __m256 xb = _mm256_set1_ps(w.x[j]);
    for (int64_t rb = 0; rb < nrb; ++rb) {
      const int32_t* words = w.bitmap() + (rb0 * w.K + k * nrb + rb) * WORDS;
      float* out = acc + rb * R;
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const uint32_t m = static_cast<uint32_t>(words[c]);
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
          float* o = out + 32 * c + 8 * g;
          _mm256_store_ps(o, _mm256_fmadd_ps(group_rows(m, g, v), xb, _mm256_load_ps(o)));
        }
        v += _mm_popcnt_u32(m);
      }
    }
  }
  std::memcpy(w.y + rb0 * R, acc, sizeof(float) * R * nrb);
}

AVX2 void touch_super(const Walk& w, int64_t sb) {
  __m256i sum = _mm256_setzero_si256();
  const int64_t rb0 = sb * SB, rb1 = std::min(w.NB, rb0 + SB);
  for (int64_t j = 0; j < w.n_active; ++j) {
    const int64_t k = w.active[j];
    const char* first = reinterpret_cast<const char*>(w.values() + w.w->offsets[rb0 * w.K + k]);
    int n = 0;
    for (int64_t rb = rb0; rb < rb1; ++rb) {
      const int32_t* words = w.bitmap() + (rb0 * w.K + k * (rb1 - rb0) + rb - rb0) * WORDS;
      n += _mm_popcnt_u32(words[0]) + _mm_popcnt_u32(words[1]) + _mm_popcnt_u32(words[2]) + _mm_popcnt_u32(words[3]);
    }
    for (const char* q = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(first) & ~uintptr_t{63}); q < first + 2 * n; q += 64)
      sum = _mm256_add_epi32(sum, _mm256_load_si256(reinterpret_cast<const __m256i*>(q)));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.y + rb0 * R), sum);
}

Weight make_weight(int64_t NB, int64_t K, Xorshift& rng) {
  Weight w;
  w.bitmap.resize(NB * K * WORDS);
  w.offsets.resize(NB * K);
  int64_t nnz = 0;
  for (int64_t c = 0; c < NB * K; ++c) {
    w.offsets[c] = static_cast<int32_t>(nnz);
    for (int64_t i = 0; i < WORDS; ++i) {
      const uint32_t word = static_cast<uint32_t>(rng.next() >> 17);  // p_w ~ 0.5
      w.bitmap[c * WORDS + i] = static_cast<int32_t>(word);
      nnz += __builtin_popcount(word);
    }
  }
  w.values.resize(nnz + R);  // the kernel's R elements of padding (the 16-byte over-reads)
  for (auto& v : w.values) {
    const float f = static_cast<float>(rng.uniform() - 0.5);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    v = static_cast<uint16_t>(u >> 16);
  }
  return w;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s N K COPIES [ROUNDS]  (PX=0.5 in the environment: the inactive fraction)\n", argv[0]);
    return 2;
  }
  const int64_t N = std::atoll(argv[1]), K = std::atoll(argv[2]);
  const int copies = std::atoi(argv[3]), rounds = argc > 4 ? std::atoi(argv[4]) : 16;
  const double px = std::getenv("PX") ? std::atof(std::getenv("PX")) : 0.5;
  const int64_t NB = (N + R - 1) / R;
  if (std::getenv("SB")) SB = std::atoll(std::getenv("SB"));
  if (std::getenv("SPD")) SPD = std::atoll(std::getenv("SPD"));
  if (SB < 1 || SB > kMaxSB) { std::fprintf(stderr, "SB must be 1..%lld\n", static_cast<long long>(kMaxSB)); return 2; }
  const int64_t NSB = (NB + SB - 1) / SB;
  Xorshift rng{88172645463325252ull};
  std::vector<Weight> weights;
  for (int i = 0; i < copies; ++i) weights.push_back(make_weight(NB, K, rng));
  std::vector<Weight> supers;
  for (int i = 0; i < copies; ++i) supers.push_back(superblock_order(weights[i], NB, K));
  std::vector<int32_t> active;
  for (int64_t k = 0; k < K; ++k)
    if (rng.uniform() >= px) active.push_back(static_cast<int32_t>(k));
  std::vector<float> x(active.size());
  for (auto& v : x) v = static_cast<float>(rng.uniform() - 0.5);
  std::vector<float> y(NB * R), y_stream(NB * R);
  {  // both decodes give the same product
    Walk w{&weights[0], active.data(), static_cast<int64_t>(active.size()), x.data(), K, NB, y.data()};
    for (int64_t rb = 0; rb < NB; ++rb) walk<false>(w, rb);
    w.y = y_stream.data();
    for (int64_t rb = 0; rb < NB; ++rb) walk<true>(w, rb);
    if (std::memcmp(y.data(), y_stream.data(), y.size() * sizeof(float)) != 0) { std::puts("products differ"); return 1; }
    w.w = &supers[0];
    for (int pf = 0; pf < 2; ++pf) {  // same products up to the summation order of the rows' FMAs
      for (int64_t sb = 0; sb < NSB; ++sb) (pf ? walk_super<true> : walk_super<false>)(w, sb);
      double err = 0;
      for (size_t i = 0; i < y.size(); ++i) err = std::max(err, static_cast<double>(std::fabs(y[i] - y_stream[i])));
      if (err > 1e-3) { std::printf("superblock product differs by %g\n", err); return 1; }
    }
  }
  using Fn = void (*)(const Walk&, int64_t);
  const char* names[] = {"walk-columns", "touch-columns", "walk-stream", "touch-stream", "walk-super", "touch-super", "walk-super-pf", "walk-columns-nobits"};
  const Fn fns[] = {walk<false>, touch_columns, walk<true>, touch_stream, walk_super<false>, touch_super, walk_super<true>, walk<false, false>};
  constexpr int F = 8;
  std::vector<double> times[F];
  int next_copy = 0;
  for (int r = 0; r < rounds; ++r)
    for (int i = 0; i < F; ++i) {
      const int f = (i + r) % F;
      const bool super = f >= 4 && f < 7;
      const int c = next_copy++ % copies;
      const Walk w{super ? &supers[c] : &weights[c], active.data(), static_cast<int64_t>(active.size()), x.data(), K, NB, y.data()};
      const auto start = std::chrono::steady_clock::now();
      for (int64_t b = 0; b < (super ? NSB : NB); ++b) fns[f](w, b);
      times[f].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3);
    }
  std::printf("# %lldx%lld, bf16, p_w ~0.5, p_x %.2f (%zu of %lld columns active), one token, %d copies, %d rounds, SB %lld\n",
              static_cast<long long>(N), static_cast<long long>(K), px, active.size(), static_cast<long long>(K), copies, rounds,
              static_cast<long long>(SB));
  for (int f = 0; f < F; ++f) {
    std::sort(times[f].begin(), times[f].end());
    std::printf("%-14s median %7.2f ms  best %7.2f ms\n", names[f], times[f][times[f].size() / 2], times[f][0]);
  }
  return 0;
}
