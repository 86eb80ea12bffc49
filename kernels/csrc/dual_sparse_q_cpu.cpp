// The CPU kernel of duoserve::dual_sparse_linear_q: the dual-sparse linear on int4/int8 codes
// (kernels/qlayout.py for the layout, kernels/qops.py for the op and its dispatch).
//
//   y[t, n] = sum_k Wq[n, k] * where(|x[t, k]| > thr, x[t, k], 0) + bias[n]   (fp32 accumulation)
//   Wq[n, k] = (c - 2^(b-1) + 1/2) * scale[rb, k / G, n % R]   for the code c of a kept (n, k)
//
// One walk for every token count: per row block (in parallel) and per chunk of up to TB tokens,
// the active columns (some token's |x| > thr) are walked in order; per column and 32-row word the
// set bits give the rows, each code is read (int8: a byte; int4: a nibble), turned into its level
// and multiplied by its row's scale in registers, and FMA'd into the chunk's fp32 accumulators
// [TB][R] (on the stack, in L1). No dequantized weight is ever written to memory. The scales of
// a row block's current group are converted from fp16 once per group (128 floats). Inactive
// columns are skipped without reading a byte of them. Portable C++ (baseline x86-64): a first,
// scalar-decoded version; the SIMD decoders of dual_sparse_cpu.cpp are not applied to codes yet.
//
// Its own translation unit: the extension's Python module is defined in dual_sparse_cpu.cpp; this
// file only registers the op's CPU kernel (the schema is defined in kernels/qops.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QR = 128;     // rows per row block (layout.py BLOCK_ROWS)
constexpr int64_t QWORDS = QR / 32;
constexpr int64_t QTB = 8;      // tokens per pass over a row block

struct QProblem {
  const int32_t* bitmap;   // [NB, K, QWORDS]
  const int32_t* offsets;  // [NB, K]
  const uint8_t* codes;    // int8: [nnz + R]; int4: two per byte, low nibble first
  const c10::Half* scales; // [NB, NG, R]
  const int32_t* active;   // [A] active columns, increasing
  int64_t n_active;
  const float* xc;         // [A, T] masked inputs of the active columns
  int64_t T, K, N, NG, G;
  int bits;
  float* y;                // [T, N] fp32
};

template <int BITS>
inline uint32_t code_at(const uint8_t* codes, int64_t pos) {
  if constexpr (BITS == 8) {
    return codes[pos];
  } else {
    return (codes[pos >> 1] >> ((pos & 1) * 4)) & 0xF;
  }
}

template <int BITS>
void walk_block(const QProblem& p, int64_t rb) {
  const float half = static_cast<float>((1 << (BITS - 1))) - 0.5f;
  float scale[QR];
  for (int64_t t0 = 0; t0 < p.T; t0 += QTB) {
    const int64_t tb = std::min<int64_t>(QTB, p.T - t0);
    float acc[QTB][QR];
    std::memset(acc, 0, sizeof(acc));
    int64_t group = -1;
    for (int64_t j = 0; j < p.n_active; ++j) {
      const int64_t k = p.active[j];
      const int64_t g = k / p.G;
      if (g != group) {  // columns are increasing: each group's scales converted once
        const c10::Half* s = p.scales + (rb * p.NG + g) * QR;
        for (int64_t r = 0; r < QR; ++r) scale[r] = static_cast<float>(s[r]);
        group = g;
      }
      float xv[QTB];
      for (int64_t t = 0; t < tb; ++t) xv[t] = p.xc[j * p.T + t0 + t];
      const int32_t* words = p.bitmap + (rb * p.K + k) * QWORDS;
      int64_t pos = p.offsets[rb * p.K + k];
      for (int64_t w = 0; w < QWORDS; ++w) {
        uint32_t m = static_cast<uint32_t>(words[w]);
        while (m) {
          const int64_t r = w * 32 + __builtin_ctz(m);
          m &= m - 1;
          const float wv = (static_cast<float>(code_at<BITS>(p.codes, pos++)) - half) * scale[r];
          for (int64_t t = 0; t < tb; ++t) acc[t][r] += wv * xv[t];
        }
      }
    }
    const int64_t rows = std::min<int64_t>(QR, p.N - rb * QR);
    for (int64_t t = 0; t < tb; ++t) {
      std::memcpy(p.y + (t0 + t) * p.N + rb * QR, acc[t], rows * sizeof(float));
    }
  }
}

// ---- AVX-512 walk (VBMI + VBMI2): per 32-row word, the word's codes are expanded into their rows
// with one vpexpandb under the word's mask, widened to fp32 and turned into levels with one masked
// FMA per 16 rows (c * s - (2^(b-1) - 1/2) * s; absent rows zeroed by the mask); int4 codes are
// first split into bytes in nibble order with one vpermt2b. Tokens in chunks of 3 (3 x 8 zmm
// accumulators, as the float walk).
constexpr int64_t QSIMD_TB = 3;

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2")))
inline __m256i word_codes_int4(const uint8_t* codes, int64_t pos, __m512i idx_even, __m512i idx_odd) {
  // 32 bytes hold nibbles [pos & ~1, pos & ~1 + 64): enough for the 32 codes from pos (padding
  // of R codes at the end of the stream keeps the load in bounds)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + (pos >> 1)));
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m512i lo = _mm512_castsi256_si512(_mm256_and_si256(raw, nib));
  const __m512i hi = _mm512_castsi256_si512(_mm256_and_si256(_mm256_srli_epi16(raw, 4), nib));
  const __m512i ordered = _mm512_permutex2var_epi8(lo, (pos & 1) ? idx_odd : idx_even, hi);
  return _mm512_castsi512_si256(ordered);  // code of nibble pos + j in byte j
}

template <int BITS, int TB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vbmi2")))
void walk_block_simd_tb(const QProblem& p, int64_t rb, int64_t t0) {
  const float half = static_cast<float>((1 << (BITS - 1))) - 0.5f;
  alignas(64) uint8_t even[64], odd[64];
  for (int j = 0; j < 64; ++j) {  // byte j <- nibble j (+1): lo (index < 64) or hi (index >= 64) half
    even[j] = static_cast<uint8_t>((j >> 1) + ((j & 1) ? 64 : 0));
    odd[j] = static_cast<uint8_t>(((j + 1) >> 1) + (((j + 1) & 1) ? 64 : 0));
  }
  const __m512i idx_even = _mm512_load_si512(even), idx_odd = _mm512_load_si512(odd);
  __m512 acc[TB][8];
  for (int t = 0; t < TB; ++t)
    for (int h = 0; h < 8; ++h) acc[t][h] = _mm512_setzero_ps();
  __m512 sc[8], off[8];
  int64_t group = -1;
  for (int64_t j = 0; j < p.n_active; ++j) {
    const int64_t k = p.active[j];
    const int64_t g = k / p.G;
    if (g != group) {
      const c10::Half* s = p.scales + (rb * p.NG + g) * QR;
      for (int h = 0; h < 8; ++h) {
        sc[h] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 16 * h)));
        off[h] = _mm512_mul_ps(sc[h], _mm512_set1_ps(-half));
      }
      group = g;
    }
    __m512 xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_set1_ps(p.xc[j * p.T + t0 + t]);
    const int32_t* words = p.bitmap + (rb * p.K + k) * QWORDS;
    int64_t pos = p.offsets[rb * p.K + k];
    for (int w = 0; w < QWORDS; ++w) {
      const uint32_t m = static_cast<uint32_t>(words[w]);
      if (!m) continue;
      __m256i c32;
      if constexpr (BITS == 8) {
        c32 = _mm256_maskz_expandloadu_epi8(m, p.codes + pos);
      } else {
        c32 = _mm256_maskz_expand_epi8(m, word_codes_int4(p.codes, pos, idx_even, idx_odd));
      }
      pos += __builtin_popcount(m);
      const __m512 c_lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(c32)));
      const __m512 c_hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(c32, 1)));
      const __m512 w_lo = _mm512_maskz_fmadd_ps(static_cast<__mmask16>(m), c_lo, sc[2 * w], off[2 * w]);
      const __m512 w_hi = _mm512_maskz_fmadd_ps(static_cast<__mmask16>(m >> 16), c_hi, sc[2 * w + 1], off[2 * w + 1]);
      for (int t = 0; t < TB; ++t) {
        acc[t][2 * w] = _mm512_fmadd_ps(w_lo, xv[t], acc[t][2 * w]);
        acc[t][2 * w + 1] = _mm512_fmadd_ps(w_hi, xv[t], acc[t][2 * w + 1]);
      }
    }
  }
  const int64_t rows = std::min<int64_t>(QR, p.N - rb * QR);
  for (int t = 0; t < TB; ++t) {
    float* out = p.y + (t0 + t) * p.N + rb * QR;
    if (rows == QR) {
      for (int h = 0; h < 8; ++h) _mm512_storeu_ps(out + 16 * h, acc[t][h]);
    } else {
      alignas(64) float tmp[QR];
      for (int h = 0; h < 8; ++h) _mm512_store_ps(tmp + 16 * h, acc[t][h]);
      std::memcpy(out, tmp, rows * sizeof(float));
    }
  }
}

template <int BITS>
void walk_block_simd(const QProblem& p, int64_t rb) {
  for (int64_t t0 = 0; t0 < p.T; t0 += QSIMD_TB) {
    const int64_t tb = std::min<int64_t>(QSIMD_TB, p.T - t0);
    if (tb == 3) walk_block_simd_tb<BITS, 3>(p, rb, t0);
    else if (tb == 2) walk_block_simd_tb<BITS, 2>(p, rb, t0);
    else walk_block_simd_tb<BITS, 1>(p, rb, t0);
  }
}

bool cpu_has_simd_decode() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
                         __builtin_cpu_supports("avx512vbmi2");
  return ok;
}

// DUOSERVE_CPU_QUANT_DECODE=scalar forces the scalar walk (tests compare both; read per call).
bool use_simd_decode() {
  const char* v = std::getenv("DUOSERVE_CPU_QUANT_DECODE");
  return cpu_has_simd_decode() && !(v && std::strcmp(v, "scalar") == 0);
}

at::Tensor linear_q_cpu(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& offsets,
                        const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& threshold,
                        const c10::optional<at::Tensor>& bias, int64_t n, int64_t k, int64_t bits,
                        int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [T, ", k, "]");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(group_size > 0, "group_size must be positive");
  const int64_t nb = (n + QR - 1) / QR, ng = (k + group_size - 1) / group_size;
  TORCH_CHECK(bitmap.scalar_type() == at::kInt && bitmap.is_contiguous() && bitmap.numel() == nb * k * QWORDS,
              "bitmap must be contiguous int32 [NB, K, 4]");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() && offsets.numel() == nb * k,
              "offsets must be contiguous int32 [NB, K]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 1, "codes must be uint8 1-D");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == nb * ng * QR,
              "scales must be contiguous float16 [NB, NG, R]");
  const int64_t T = x.size(0);
  const float thr = threshold.item<float>();
  at::Tensor xf = x.to(at::kFloat).contiguous();  // [T, K]
  const float* xp = xf.data_ptr<float>();
  // Active columns (any token's |x| > thr; NaN fails the comparison) and their masked inputs.
  std::vector<int32_t> active;
  std::vector<float> xc;
  active.reserve(k);
  xc.reserve(k * T);
  for (int64_t c = 0; c < k; ++c) {
    bool any = false;
    for (int64_t t = 0; t < T; ++t) any |= std::fabs(xp[t * k + c]) > thr;
    if (!any) continue;
    active.push_back(static_cast<int32_t>(c));
    for (int64_t t = 0; t < T; ++t) {
      const float v = xp[t * k + c];
      xc.push_back(std::fabs(v) > thr ? v : 0.0f);
    }
  }
  at::Tensor y = at::zeros({T, n}, x.options().dtype(at::kFloat));
  if (T > 0 && n > 0) {
    QProblem p{bitmap.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), codes.data_ptr<uint8_t>(),
               scales.data_ptr<c10::Half>(), active.data(), static_cast<int64_t>(active.size()), xc.data(),
               T, k, n, ng, group_size, static_cast<int>(bits), y.data_ptr<float>()};
    // a task of about 256k weights, as the float walk
    const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, QR * k));
    const bool simd = use_simd_decode();
    at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t rb = b0; rb < b1; ++rb) {
        if (simd) {
          if (p.bits == 8) walk_block_simd<8>(p, rb); else walk_block_simd<4>(p, rb);
        } else {
          if (p.bits == 8) walk_block<8>(p, rb); else walk_block<4>(p, rb);
        }
      }
    });
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(duoserve, CPU, m) { m.impl("dual_sparse_linear_q", &linear_q_cpu); }
