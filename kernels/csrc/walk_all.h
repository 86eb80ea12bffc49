// Whether a walk skips the inactive columns or walks them all: the policies and their one-time
// measurement on this machine.
// One part of the CPU kernel's single translation unit: dual_sparse_cpu.cpp includes them all.
#pragma once

#include "common.h"
#include "prefetch.h"
#include "dispatch.h"

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

