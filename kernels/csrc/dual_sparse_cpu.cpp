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
//
// The kernel is one translation unit, split by concern into the headers below and included in
// this order: the walks' helpers must inline into the walks across the decoders' target
// attributes (see prefetch_column in prefetch.h), and one unit keeps the build a single compile.
//   common.h                  layout constants, Problem, bf16 helpers
//   prefetch.h                software prefetch (per column / stream), walk-all request state
//   decode_scalar.h           the scalar walk
//   decode_avx512_expand.h    AVX-512 vpexpand decoder: walks, tile unpack
//   decode_avx2.h             AVX2 decoder: walk, tile unpack
//   decode_avx512_permute.h   AVX-512 permute decoder: walks, slices walk, bf16 panel walk, tile unpack
//   amx_panel.h               the AMX panel path: tile operations (instructions / emulated), the block
//   dispatch.h                CPU features, the decoder choice (measured), the walk of one row block
//   amx_dispatch.h            whether and from how many tokens bf16 calls take the AMX path
//   walk_all.h                skip the inactive columns or walk them all: policies, measurement
// This file: input masking, the spmspv and tiled entry points, settings, the Python bindings.
#include "common.h"
#include "decode_scalar.h"
#include "prefetch.h"
#include "decode_avx512_expand.h"
#include "decode_avx2.h"
#include "decode_avx512_permute.h"
#include "dispatch.h"
#include "amx_dispatch.h"

namespace {

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
  // The walks read values[offsets[c] .. offsets[c] + popcount(bitmap[c]) + R) per column c, in
  // (rb, k) order. Offsets built by the packer (kernels/layout.py) are an exclusive prefix sum, so
  // checking the first and the last column bounds every read; PackedWeight.from_tensors checks
  // every column of tensors from elsewhere (PackedWeight.check_index). O(1) a call.
  if (nb * k > 0) {
    const int32_t* off = offsets.data_ptr<int32_t>();
    const int32_t* last = bitmap.data_ptr<int32_t>() + (nb * k - 1) * WORDS;
    int64_t last_count = 0;
    for (int64_t w = 0; w < WORDS; ++w) last_count += __builtin_popcount(static_cast<uint32_t>(last[w]));
    const int64_t end = static_cast<int64_t>(off[nb * k - 1]) + last_count;
    TORCH_CHECK(off[0] == 0 && off[nb * k - 1] >= 0 && end + R <= values.numel(),
                "packed weight is inconsistent: its index addresses values up to element ", end + R,
                " (first offset ", off[0], "), but values has ", values.numel(),
                " elements; rebuild it with duoserve.kernels.pack_dense / pack_bitmask");
  }
}

void check_call(const torch::Tensor& threshold, const c10::optional<torch::Tensor>& bias, int64_t n) {
  TORCH_CHECK(threshold.numel() == 1, "threshold must hold one number, got ", threshold.numel());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->device().is_cpu(),
                "bias must be a CPU tensor [", n, "] (one per output), got ", bias->sizes());
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

#include "walk_all.h"

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

// Where column j of token t goes in the panel walk's chunk-major input (Problem::xpairs), in bf16
// elements: chunk j / PANEL_COLUMNS, token t, position j % PANEL_COLUMNS.
inline int64_t panel_input_index(int64_t j, int64_t t, int64_t T) {
  return ((j / PANEL_COLUMNS) * T + t) * PANEL_COLUMNS + j % PANEL_COLUMNS;
}

// The panel walk's inputs when every column is walked: per token, the masked bf16 bits of x's row
// (exact: x came from bf16), in the chunk-major order of Problem::xpairs (out zeroed beforehand:
// the pad after a last partial chunk stays 0).
DS_AVX512_PERM void masked_bf16_rows_avx512(const float* x, int64_t T, int64_t K, float thr, uint32_t* out) {
  static_assert(PANEL_COLUMNS % 16 == 0, "16 columns at a time stay inside one chunk");
  const __m512 limit = _mm512_set1_ps(thr);
  uint16_t* dst = reinterpret_cast<uint16_t*>(out);
  for (int64_t t = 0; t < T; ++t) {
    const float* row = x + t * K;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 lanes = first_lanes(K - k);
      const __m512 v = _mm512_maskz_loadu_ps(lanes, row + k);
      const __mmask16 keep = _mm512_mask_cmp_ps_mask(lanes, _mm512_abs_ps(v), limit, _CMP_GT_OQ);
      _mm256_mask_storeu_epi16(dst + panel_input_index(k, t, T), lanes,
                               _mm512_cvtepi32_epi16(_mm512_maskz_srli_epi32(keep, _mm512_castps_si512(v), 16)));
    }
  }
}

// Whether spmspv runs a bf16 call of T tokens with the panel walk (any T from the minimum: linear_cpu
// sends calls there only up to g_bf16_dot_max_tb). The panel has its own gather, so it runs whichever
// SIMD decoder the walk measured faster; a forced scalar decoder turns it off.
bool panel_enabled(int64_t T) {
  if (g_bf16_dot_min_tb == 0 || !cpu_has_bf16_dot() || active_decoder(true) == Decoder::kScalar) return false;
  const int64_t lo = panel_min_tokens();
  return lo > 0 && T >= lo;
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
  check_call(threshold, bias, n);
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
  // pair inputs: the AMX panel path, or the vdpbf16ps panel walk
  const AmxKind amx = bf16 ? amx_kind_for(T, decoder) : kNoAmx;
  const bool pair_inputs = amx != kNoAmx || (bf16 && decoder != Decoder::kScalar && panel_enabled(T));
  const bool streams = decoder != Decoder::kScalar && !pair_inputs &&
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
  std::vector<uint32_t> xpairs;   // the panel's, chunk-major [ceil(A / 64), T, 32] (Problem::xpairs)
  if (pair_inputs) {
    // per chunk and token, the masked bf16 inputs of the active columns in order (exact: they
    // came from bf16), two to a 32-bit word, zeros after the last column (Problem::xpairs)
    const int64_t chunks = (A + PANEL_COLUMNS - 1) / PANEL_COLUMNS;
    xpairs.assign(chunks * T * (PANEL_COLUMNS / 2), 0u);
    if (A == K) {  // every column walked (the rule past a few tokens): no gather
      masked_bf16_rows_avx512(xp, T, K, thr, xpairs.data());
    } else {
      uint16_t* dst = reinterpret_cast<uint16_t*>(xpairs.data());
      for (int64_t t = 0; t < T; ++t) {
        const float* row = xp + t * K;
        for (int64_t j = 0; j < A; ++j) {
          const float v = row[active[j]];
          uint32_t bits;
          std::memcpy(&bits, &v, 4);
          dst[panel_input_index(j, t, T)] = std::fabs(v) > thr ? static_cast<uint16_t>(bits >> 16) : 0;
        }
      }
    }
    p.xpairs = xpairs.data();
    p.pairs = PANEL_COLUMNS / 2;
    p.amx = amx;
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
  TORCH_CHECK(bitmap.dim() == 3 && n > (bitmap.size(0) - 1) * R && n <= bitmap.size(0) * R,
              "n = ", n, " does not fit the bitmap's row blocks of ", R);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == bitmap.size(1), "x must be [T, ", bitmap.size(1), "]");
  check_call(threshold, bias, n);
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
  check_call(threshold, bias, n);
  const bool sparse_dtype = x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat;
  if (sparse_dtype && x.size(0) <= sparse_max_tokens_for(x.scalar_type() == torch::kBFloat16))
    return spmspv(x, bitmap, offsets, values, threshold, bias, n, 0);
  if (x.scalar_type() == torch::kBFloat16 && x.size(0) <= g_bf16_dot_max_tb && panel_enabled(x.size(0)))
    return spmspv(x, bitmap, offsets, values, threshold, bias, n, 0);
  // the AMX panel path has no upper bound: prefill chunks stay bound by the packed bytes
  if (x.scalar_type() == torch::kBFloat16 && amx_kind_for(x.size(0), active_decoder(true)) != kNoAmx)
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
  TORCH_CHECK(min_tb == 0 || ((min_tb == -1 || 1 <= min_tb) && (min_tb == -1 ? 5 : min_tb) <= max_tb && max_tb <= 4096),
              "bf16 dot-product (panel) walk: min_tokens 0 (off), -1 (measured: 4 or 5) or "
              "1 <= min_tokens <= max_tokens <= 4096, got ", min_tb, " and ", max_tb);
  g_bf16_dot_min_tb = min_tb;
  g_bf16_dot_max_tb = max_tb;
}
// [min_tokens, max_tokens]: the measured minimum where none was set (0: off)
std::vector<int64_t> get_bf16_dot_tokens() { return {panel_min_tokens(), g_bf16_dot_max_tb}; }
bool get_bf16_dot_min_measured() { return g_bf16_dot_min_tb < 0; }
int64_t get_bf16_dot_max_tokens() { return g_bf16_dot_max_tb; }  // without measuring the minimum
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

// "auto" (the default: the tile instructions where the CPU, the OS and the self-check allow),
// "off", "on" (refused where unavailable, with the reason) or "emulate" (tests).
void set_amx(const std::string& mode) {
  if (mode == "auto") { g_amx_request = -1; return; }
  if (mode == "off") { g_amx_request = 0; return; }
  if (mode == "emulate") {
    TORCH_CHECK(cpu_has_bf16_dot(), "the emulated AMX path needs the panel walk's AVX-512 BF16 / BITALG instructions");
    g_amx_request = 2;
    return;
  }
  TORCH_CHECK(mode == "on", "AMX mode must be auto, off, on or emulate, got '", mode, "'");
  TORCH_CHECK(amx_availability().ok, "AMX requested but unavailable: ", amx_availability().why);
  g_amx_request = 1;
}
// [what bf16 batches run on: "tiles", "emulated" or "off", why]
std::vector<std::string> amx_info() {
  const AmxKind kind = amx_kind();
  const std::string what = kind == kAmxTiles ? "tiles" : kind == kAmxEmulated ? "emulated" : "off";
  if (g_amx_request == 0) return {what, "turned off (set_amx / DUOSERVE_CPU_AMX)"};
  if (g_amx_request == 2) return {what, kind == kAmxEmulated ? "scalar emulation of the tile operations (tests)"
                                                              : "emulation needs AVX-512 BF16"};
  return {what, amx_availability().why};
}
void set_amx_min_tokens(int64_t t) {
  TORCH_CHECK(t == -1 || t >= 1, "AMX minimum tokens: -1 (measured) or >= 1, got ", t);
  g_amx_min_tb = t;
}
// "tiles" (refused where unavailable) or "emulate" -> the probe's largest relative error.
double amx_probe(const std::string& mode) {
  if (mode == "emulate") {
    TORCH_CHECK(cpu_has_bf16_dot(), "the emulated AMX probe needs AVX-512 BF16 / BITALG");
    return amx_probe_error<EmulatedTiles>();
  }
  TORCH_CHECK(mode == "tiles", "probe mode must be tiles or emulate, got '", mode, "'");
  TORCH_CHECK(amx_availability().ok, "AMX unavailable: ", amx_availability().why);
  return amx_probe_error<AmxTiles>();
}

// The op's schema has one definition, in Python (kernels/ops.py, SCHEMA), made before this
// extension is loaded; this file registers only its CPU kernel.
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
        "bf16 with AVX512-BF16: batches of min..max tokens take the vdpbf16ps panel walk (min 0 = off, "
        "-1 = measured: 4 or 5); "
        "larger batches the tiled path");
  m.def("get_bf16_dot_tokens", &get_bf16_dot_tokens, "[min_tokens, max_tokens] of the panel walk");
  m.def("get_bf16_dot_max_tokens", &get_bf16_dot_max_tokens, "max_tokens of the panel walk");
  m.def("get_bf16_dot_min_measured", &get_bf16_dot_min_measured,
        "whether the panel walk's minimum token count is the measured one (not set)");
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
  m.def("set_amx", &set_amx, "bf16 batches on AMX tiles: auto, off, on or emulate (tests)");
  m.def("amx_info", &amx_info, "[tiles | emulated | off, why]");
  m.def("set_amx_min_tokens", &set_amx_min_tokens, "AMX from this many tokens (-1: measured)");
  m.def("get_amx_min_tokens", &amx_min_tokens, "the AMX path's minimum tokens in use (measured on first use)");
  m.def("amx_probe", &amx_probe, "largest relative error of the AMX path ('tiles' or 'emulate') on a fixed problem");
  m.def("amx_probe_tolerance", []() { return kAmxProbeTolerance; });
}
