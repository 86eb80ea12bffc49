// How fast does this CPU issue the instructions the CPU kernel's two decoders are built from?
// Eight independent streams of each instruction (so latency does not bound them), 20M rounds, one
// thread; prints nanoseconds per instruction. The FMA row is the reference: compare the others with
// it rather than trusting a clock rate. The `expand` decoder spends one vpexpandw per 32 rows (bf16),
// the `permute` decoder one vpermw plus one vpopcntw (docs/kernels.md, "CPU kernel").
//
//   gcc -O2 -o /tmp/simd_throughput scripts/simd_throughput.c && /tmp/simd_throughput
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2,avx512vpopcntdq,avx512bitalg,avx512bf16"), noinline))
#define ROUNDS 20000000L
// The stream loop must be unrolled, or GCC keeps the accumulators in memory and every round waits
// on a store and a reload (the version before 2026-11-28 measured that: its FMA "reference" was
// 0.44 ns, the unrolled loop 0.12 ns, on the Zen 5 host).
#define UNROLL _Pragma("GCC unroll 32")

static uint16_t buf[4096] __attribute__((aligned(64)));

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// Each function returns ns per instruction; the result is folded into `sink` so nothing is elided.
static volatile int64_t sink;

TARGET static double expandw(void) {
  __m512i src[8], acc[8];
  for (int i = 0; i < 8; ++i) src[i] = _mm512_loadu_si512(buf + 8 * i), acc[i] = _mm512_setzero_si512();
  double t0 = now();
  for (long n = 0; n < ROUNDS; ++n)
    UNROLL for (int i = 0; i < 8; ++i) acc[i] = _mm512_add_epi16(acc[i], _mm512_maskz_expand_epi16(0x5a5a5a5au ^ (uint32_t)(n + i), src[i]));
  double t = now() - t0;
  for (int i = 0; i < 8; ++i) sink += _mm512_reduce_add_epi32(acc[i]);
  return t / ROUNDS / 8 * 1e9;
}

TARGET static double expandps(void) {
  __m512 src[8], acc[8];
  for (int i = 0; i < 8; ++i) src[i] = _mm512_loadu_ps((const float*)buf + 8 * i), acc[i] = _mm512_setzero_ps();
  double t0 = now();
  for (long n = 0; n < ROUNDS; ++n)
    UNROLL for (int i = 0; i < 8; ++i) acc[i] = _mm512_add_ps(acc[i], _mm512_maskz_expand_ps((__mmask16)(0x5a5a ^ (n + i)), src[i]));
  double t = now() - t0;
  for (int i = 0; i < 8; ++i) sink += (int64_t)_mm512_reduce_add_ps(acc[i]);
  return t / ROUNDS / 8 * 1e9;
}

// One instruction applied to eight 512-bit integer streams, each feeding its own result back (a
// chain per stream): ns per instruction.
#define INT_CHAIN(name, op)                                                             \
  TARGET static double name(void) {                                                     \
    __m512i src[8], idx = _mm512_loadu_si512(buf + 100); /* vpermw's indices */         \
    (void)idx;                                                                          \
    for (int i = 0; i < 8; ++i) src[i] = _mm512_loadu_si512(buf + 8 * i);               \
    double t0 = now();                                                                  \
    for (long n = 0; n < ROUNDS; ++n)                                                   \
      UNROLL for (int i = 0; i < 8; ++i) src[i] = op;                                   \
    double t = now() - t0;                                                              \
    for (int i = 0; i < 8; ++i) sink += _mm512_reduce_add_epi32(src[i]);                \
    return t / ROUNDS / 8 * 1e9;                                                        \
  }

INT_CHAIN(permw, _mm512_permutexvar_epi16(idx, src[i]))
INT_CHAIN(permt2w, _mm512_permutex2var_epi16(src[i], idx, idx))
INT_CHAIN(popcntd, _mm512_popcnt_epi32(src[i]))
INT_CHAIN(permt2b, _mm512_permutex2var_epi8(src[i], idx, idx))
INT_CHAIN(zxbw, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(src[i])))
INT_CHAIN(expandb_ymm, _mm512_castsi256_si512(_mm256_mask_expand_epi8(_mm512_castsi512_si256(idx), (__mmask32)(0x5a5a5a5au ^ (uint32_t)(n + i)), _mm512_castsi512_si256(src[i]))))
INT_CHAIN(popcntw, _mm512_popcnt_epi16(src[i]))

TARGET static double fmadd(void) {
  __m512 acc[8], b = _mm512_set1_ps(0.999f);
  for (int i = 0; i < 8; ++i) acc[i] = _mm512_set1_ps((float)i);
  double t0 = now();
  for (long n = 0; n < ROUNDS; ++n)
    UNROLL for (int i = 0; i < 8; ++i) acc[i] = _mm512_fmadd_ps(acc[i], b, b);
  double t = now() - t0;
  for (int i = 0; i < 8; ++i) sink += (int64_t)_mm512_reduce_add_ps(acc[i]);
  return t / ROUNDS / 8 * 1e9;
}

// The panel walk's micro-kernel instruction; 24 streams, as many as its accumulators, since its
// latency is longer than an FMA's.
TARGET static double dpbf16(void) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_setzero_ps();
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3F803F80), b = (__m512bh)_mm512_set1_epi32(0x00010001);
  double t0 = now();
  for (long r = 0; r < ROUNDS; ++r)
    UNROLL for (int i = 0; i < 24; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  double t = now() - t0;
  __m512 s = acc[0];
  for (int i = 1; i < 24; ++i) s = _mm512_add_ps(s, acc[i]);
  sink = (int64_t)_mm512_reduce_add_ps(s);
  return t / (ROUNDS * 24.0) * 1e9;
}

int main(void) {
  for (int i = 0; i < 4096; ++i) buf[i] = (uint16_t)(i * 7);
  printf("ns per instruction (8 independent streams, one thread)\n");
  printf("vfmadd231ps zmm          %.3f   (reference)\n", fmadd());
  printf("vpexpandw zmm{k}{z}      %.3f   (expand decoder, bf16)\n", expandw());
  printf("vexpandps zmm{k}{z}      %.3f   (expand decoder, fp32)\n", expandps());
  printf("vpermw zmm               %.3f   (permute decoder)\n", permw());
  printf("vpermt2w zmm             %.3f   (panel walk decoder: two columns' words in one permute)\n", permt2w());
  printf("vpermt2b zmm             %.3f   (int4 walks: nibbles to bytes, two columns' bytes interleaved)\n", permt2b());
  printf("vpmovzxbw ymm->zmm       %.3f   (int4 pair walk: codes to 16-bit indices)\n", zxbw());
  printf("vpexpandb ymm{k}         %.3f   (int4 walks: a word's codes into their rows)\n", expandb_ymm());
  printf("vpopcntd zmm             %.3f   (permute decoder, fp32)\n", popcntd());
  printf("vpopcntw zmm             %.3f   (permute decoder, bf16)\n", popcntw());
  printf("vdpbf16ps zmm            %.3f   (panel walk micro-kernel; 24 streams)\n", dpbf16());
  return 0;
}
