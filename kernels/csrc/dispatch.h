// What this CPU can run, which decoder walks a row block (measured once per process), and the
// walk of one row block.
// One part of the CPU kernel's single translation unit: dual_sparse_cpu.cpp includes them all.
#pragma once

#include "common.h"
#include <cpuid.h>
#include "decode_scalar.h"
#include "decode_avx512_expand.h"
#include "decode_avx2.h"
#include "decode_avx512_permute.h"
#include "amx_panel.h"

namespace {

// Whether the OS saves (and so lets this process use) every register state in `mask` (XCR0
// bits: 0x6 SSE + AVX's ymm, 0xe0 AVX-512's opmask and zmm). A CPUID flag alone is not enough: a
// hypervisor or kernel may leave the state off, and an instruction on disabled state raises #UD
// (SIGILL). libgcc's __builtin_cpu_supports checks this too since GCC 11; the check here makes it
// explicit and independent of the toolchain. (AMX needs more: a per-process permission, see
// duoserve/kernels/cpu_features.py.)
bool os_saves_state(uint64_t mask) {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return false;
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  return (xcr0 & mask) == mask;
}
constexpr uint64_t kXcr0Avx = 0x6, kXcr0Avx512 = 0xe6;

bool cpu_has_avx2() {  // what DS_AVX2 enables
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("popcnt") && os_saves_state(kXcr0Avx);
  return ok;
}

bool cpu_has_avx512() {
  static const bool ok = os_saves_state(kXcr0Avx512) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
                         __builtin_cpu_supports("popcnt");
  return ok;
}

bool cpu_has_permute_isa() {  // what DS_AVX512_PERM enables
  static const bool ok = os_saves_state(kXcr0Avx512) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
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
    if (p.amx == 1)
      block_amx_panel<AmxTiles>(p, rb, out);
    else if (p.amx == 2)
      block_amx_panel<EmulatedTiles>(p, rb, out);
    else
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

// A synthetic call for the one-time measurements below: NB row blocks x K columns at p_w ~0.5
// (synthetic_index), every column active, T tokens of 0.5 against weights of 1.0, as the walks'
// column-major inputs (xc); `panel()` gives the same call as the panel walk reads it. Not copyable:
// the Problems point into its vectors.
struct SyntheticCall {
  SyntheticIndex index;
  std::vector<uint16_t> v16;
  std::vector<float> v32, xc, y;
  std::vector<int32_t> active;
  std::vector<uint32_t> xpairs;
  Problem walk{};
  SyntheticCall(int64_t NB, int64_t K, int64_t T, bool bf16, uint64_t seed) {
    Xorshift rng{seed};
    index = synthetic_index(NB, K, rng);
    v16.assign(bf16 ? index.nnz + R : 0, 0x3F80);  // 1.0
    v32.assign(bf16 ? 0 : index.nnz + R, 1.f);
    active.resize(K);
    for (int64_t k = 0; k < K; ++k) active[k] = static_cast<int32_t>(k);
    xc.assign(K * T, 0.5f);
    y.assign(T * NB * R, 0.f);
    walk = Problem{index.bitmap.data(), index.offsets.data(), bf16 ? static_cast<const void*>(v16.data()) : v32.data(),
                   active.data(), K, xc.data(), T, K, NB * R, y.data()};
    walk.n_values = index.nnz + R;
  }
  SyntheticCall(const SyntheticCall&) = delete;
  SyntheticCall& operator=(const SyntheticCall&) = delete;
  Problem panel() {  // bf16 only; chunk-major inputs [K / 64, T, 32] of 0.5 in both halves
    xpairs.assign((walk.K + PANEL_COLUMNS - 1) / PANEL_COLUMNS * walk.T * (PANEL_COLUMNS / 2), 0x3F003F00u);
    Problem p = walk;
    p.xc = nullptr;
    p.xpairs = xpairs.data();
    p.pairs = PANEL_COLUMNS / 2;
    return p;
  }
};

// Whether candidate 1 (problem, decoder) walked every row block faster than candidate 0: best of 7
// passes each, alternated, so a drift in the machine's speed hits both.
bool second_is_faster(const Problem& p0, Decoder d0, const Problem& p1, Decoder d1, bool bf16) {
  const Problem* problems[2] = {&p0, &p1};
  const Decoder decoders[2] = {d0, d1};
  const int64_t nb = (p0.N + R - 1) / R;
  double best[2] = {1e30, 1e30};
  for (int pass = 0; pass < 7; ++pass)
    for (int i = 0; i < 2; ++i) {
      const auto start = std::chrono::steady_clock::now();
      for (int64_t rb = 0; rb < nb; ++rb) run_block(*problems[i], rb, bf16, decoders[i]);
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      best[i] = std::min(best[i], took.count());
    }
  return best[1] < best[0];
}

Decoder calibrate_decoder(bool bf16) {
  if (!cpu_has_permute_isa())
    return cpu_has_avx512() ? Decoder::kExpand : cpu_has_avx2() ? Decoder::kAvx2 : Decoder::kScalar;
  if (!cpu_has_avx512()) return Decoder::kPermute;
  SyntheticCall call(8, 512, 1, bf16, 0x9E3779B97F4A7C15ull);
  return second_is_faster(call.walk, Decoder::kExpand, call.walk, Decoder::kPermute, bf16) ? Decoder::kPermute
                                                                                          : Decoder::kExpand;
}

Decoder active_decoder(bool bf16) {
  if (g_decoder_request >= 0) return static_cast<Decoder>(g_decoder_request);
  static const Decoder measured_bf16 = calibrate_decoder(true);  // thread-safe, once per process
  static const Decoder measured_f32 = calibrate_decoder(false);
  return bf16 ? measured_bf16 : measured_f32;
}

// Whether 4-token bf16 calls take the panel walk or the decoder's own walk (the one-pass slices
// walk with the permute decoder): which is faster depends on the CPU, so it is measured once per
// process, on the same kind of synthetic in-cache problem as the decoder (8 row blocks x 512
// columns, p_w ~0.5, every column active, as at 4 tokens at p_x 0.5 where 94% of the columns are
// active for some token), best of 7 alternated passes each. On the Zen 4 host (2026-12-06, bf16,
// p_w = p_x = 0.5, one thread, weights from DRAM) the panel walk took 2-22% less time at 4 tokens
// (4096x11008: 6.9 against 8.8 ms; 1536x576: 0.149 against 0.193) and much more at 2-3 tokens (the
// 1-3 token walks stay there); from 5 tokens it won on the Zen 4 and Zen 5 hosts
// (docs/reports/cpu-2026-11-27-panel, cpu-2026-11-28-zen4-panel, cpu-2026-12-06-zen4-batched).
int64_t measure_panel_min_tokens() {
  const Decoder d = active_decoder(true);
  if (!cpu_has_bf16_dot() || d == Decoder::kScalar) return 5;
  SyntheticCall call(8, 512, 4, true, 0x2545F4914F6CDD1Dull);
  const Problem panel = call.panel();
  return second_is_faster(call.walk, d, panel, d, true) ? 4 : 5;
}

// The fewest tokens of a bf16 call that takes the panel walk (0: never): the requested count, or
// the measured one.
int64_t panel_min_tokens() {
  if (g_bf16_dot_min_tb >= 0) return g_bf16_dot_min_tb;
  static const int64_t measured = measure_panel_min_tokens();  // thread-safe, once per process
  return measured;
}

}  // namespace
