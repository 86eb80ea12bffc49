// The scalar walk: any x86-64 CPU, and the oracle for the SIMD walks' indexing.
// One part of the CPU kernel's single translation unit: dual_sparse_cpu.cpp includes them all.
#pragma once

#include "common.h"

namespace {

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

}  // namespace
