// Does skipping inputs pay on this CPU if every input column's weights were one contiguous span
// (a column-major layout)? Streams a 512 MiB buffer as spans of S bytes and times reading all
// spans against reading a random half of them (listed in advance, as the kernel's active-column
// list is), with software prefetch of the span D entries ahead (D = 0: none). One thread.
//
//   gcc -O2 -mavx512f -o /tmp/skip_bandwidth scripts/skip_bandwidth.c && taskset -c 1 /tmp/skip_bandwidth
//   (on a CPU without AVX-512: -mavx2, which reads each line as two 32-byte loads)
//
// A ratio near 0.5 would mean skipping half the columns halves the time; docs/kernels.md has the
// numbers measured here (spans of a SmolLM2 column: 576-1536 rows x ~1.16 B = 670-1800 B).
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifdef __AVX512F__
typedef __m512i vec;
#define VEC_ZERO() _mm512_setzero_si512()
#define VEC_ADD(a, b) _mm512_add_epi32(a, b)
#define VEC_ADD_LINE(acc, p) _mm512_add_epi32(acc, _mm512_loadu_si512(p))
#define VEC_STORE(out, v) _mm512_storeu_si512(out, v)
#else
typedef __m256i vec;
#define VEC_ZERO() _mm256_setzero_si256()
#define VEC_ADD(a, b) _mm256_add_epi32(a, b)
#define VEC_ADD_LINE(acc, p) \
  _mm256_add_epi32(_mm256_add_epi32(acc, _mm256_loadu_si256((const __m256i*)(p))), \
                   _mm256_loadu_si256((const __m256i*)((p) + 32)))
#define VEC_STORE(out, v) _mm256_storeu_si256((__m256i*)(out), v)
#endif

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static double read_spans(const char* buf, size_t span, const size_t* list, size_t n, int ahead,
                         vec* sink) {
  vec acc = VEC_ZERO();
  double t0 = now();
  for (size_t j = 0; j < n; j++) {
    if (ahead && j + ahead < n) {
      const char* q = buf + list[j + ahead] * span;
      for (size_t o = 0; o < span; o += 64) _mm_prefetch(q + o, _MM_HINT_T0);
    }
    const char* p = buf + list[j] * span;
    for (size_t o = 0; o + 64 <= span; o += 64) acc = VEC_ADD_LINE(acc, p + o);
  }
  double t = now() - t0;
  *sink = VEC_ADD(*sink, acc);  // keep the loads alive
  return t;
}

int main(void) {
  const size_t total = 512ul << 20;
  char* buf = aligned_alloc(64, total);
  for (size_t i = 0; i < total; i++) buf[i] = (char)i;
  const size_t spans[] = {128, 192, 256, 512, 640, 1024, 1792, 4096, 12800};  // 128: a bf16 p_w 0.5 column of a row block
  const int aheads[] = {0, 2, 8};
  vec sink = VEC_ZERO();
  srand(0);
  for (size_t s = 0; s < sizeof spans / sizeof spans[0]; s++) {
    size_t span = spans[s], n = total / span, n_half = 0;
    size_t *all = malloc(n * sizeof *all), *half = malloc(n * sizeof *half);
    for (size_t i = 0; i < n; i++) {
      all[i] = i;
      if (rand() & 1) half[n_half++] = i;
    }
    double t_all = 1e9;
    for (int r = 0; r < 3; r++) {
      double t = read_spans(buf, span, all, n, 0, &sink);
      if (t < t_all) t_all = t;
    }
    printf("span %5zu B: all %.1f ms (%.1f GB/s); random half / all:", span, t_all * 1e3, total / t_all / 1e9);
    for (int a = 0; a < 3; a++) {
      double t_half = 1e9;
      for (int r = 0; r < 3; r++) {
        double t = read_spans(buf, span, half, n_half, aheads[a], &sink);
        if (t < t_half) t_half = t;
      }
      printf("  prefetch %d: %.2f", aheads[a], t_half / t_all);
    }
    printf("\n");
    free(all);
    free(half);
  }
  int out[16];
  VEC_STORE(out, sink);
  printf("checksum %d\n", out[0]);  // keeps the loads observable
  return 0;
}
