// Software prefetch for the walks (per column, or a stream over the row block), and the
// walk-all policy's request state.
// One part of the CPU kernel's single translation unit: dual_sparse_cpu.cpp includes them all.
#pragma once

#include "common.h"

namespace {

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
// fewer the column prefetch reads so few lines that it wins. Zen 3, bf16, p_w 0.5, one token,
// 11008x4096 / 4096x11008, medians of alternated rounds (scripts/prefetch_ab.py,
// docs/reports/cpu-2026-11-29-zen3-bitmap-prefetch): columns against stream 7.7 / 7.0 ms against
// 6.6 / 6.2 at p_x 0.7, 5.8 / 6.4 against 6.1 / 6.1 at 0.75, 5.7 / 5.7 against 6.3 / 6.3 at 0.8,
// 3.6 / 3.9 against 6.6 / 6.6 at 0.9 (0.15 until the column prefetch also fetched the bitmap words).
int64_t g_prefetch_stream = -1;
constexpr int64_t kAvx2StreamBytes = 4096;  // 1-16 KiB level within the Zen 3 host's noise
constexpr double kStreamMinActive = 0.25;
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
  // The column's bitmap words too. With few columns active, consecutive active columns' words sit
  // on different lines; a walk keeps only about two columns in flight (each is ~130 instructions),
  // so without this every column's words missed DRAM in turn. In the AVX2 walk's model
  // (scripts/avx2_walk_memory.cpp, Zen 3, 11008x4096, p_x 0.9) the column walk took 4.7-5.8 ms
  // without this, 3.1-3.6 with it (merely touching its lines: 2.4-2.5); the kernel at p_x 0.9 went
  // from 2.3-2.7x dense torch.matmul to 3.7-4.3x (docs/reports/cpu-2026-11-29-zen3-bitmap-prefetch).
  // Its offset needs no prefetch: it is read here.
  _mm_prefetch(reinterpret_cast<const char*>(p.bitmap + col * WORDS), static_cast<_mm_hint>(HINT));
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

}  // namespace
