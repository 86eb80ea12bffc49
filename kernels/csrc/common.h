// Shared by every part: the layout constants, the Problem a walk reads, bf16 helpers and the
// store of a row block's accumulators.
// One part of the CPU kernel's single translation unit: dual_sparse_cpu.cpp includes them all.
#pragma once

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
  // For the panel walk (block_bf16_dot_panel; null when it does not run): chunk-major
  // [ceil(A / PANEL_COLUMNS), T, pairs] with pairs = PANEL_COLUMNS / 2: per chunk of active
  // columns and token, the bf16 bits of the chunk's columns 2i (low half) and 2i + 1 (high half).
  // Chunk-major so that the inputs one panel multiplies are one contiguous block (T x 128 B), not
  // T lines a whole input row apart (token-major: at K = 11008 and 256 tokens, 5.6 MiB of rows
  // re-read from L3 per row block: 0.65x of vLLM's GEMM there on the Zen 4 host, 0.78x chunk-major;
  // docs/reports/cpu-2026-12-06-zen4-batched).
  const uint32_t* xpairs = nullptr;
  int64_t pairs = 0;
  int64_t n_values = 0;  // elements of values: where the stream prefetch stops (0: no stream prefetch)
  // With xpairs: 0 the panel walk, else the AMX panel path (amx_dispatch.h's AmxKind: 1 the tile
  // instructions, 2 their scalar emulation).
  int amx = 0;
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

}  // namespace
