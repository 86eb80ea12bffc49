// The AMX panel path (bf16, CPUs with AMX-BF16): load as sparse, compute as dense on the matrix
// engine. Per row block, the active columns are decoded a K-chunk at a time into the same pair
// panel the vdpbf16ps panel walk uses (decode_pair_panel), which is exactly the B operand of an AMX
// tile multiply: 32-bit lane i of a panel line holds (column 2k, column 2k + 1) of row i, one line
// per pair of columns and 16-row group, so a B tile (16 pairs x 16 rows) is 16 panel lines 512 bytes
// apart. The A operand is the panel walk's chunk-major inputs (Problem::xpairs): a token's 32 pairs
// of a 64-column chunk are 128 contiguous bytes, so an A tile (16 tokens x 16 pairs) is 16 rows 128
// bytes apart. C: 16 tokens x 16 rows of fp32 sums, the block's [T, R] scratch 512 bytes a token.
//
// The panel is decoded once per call whatever the batch, so from a few tokens to prefill chunks the
// call stays bound by the packed bytes and the decode rather than by products (vdpbf16ps: 32 bf16
// products a cycle; a tile multiply: 16 x 16 x 32 in about 16 cycles). Every tile op is written
// twice: AmxTiles (the instructions) and EmulatedTiles (the same semantics in scalar C++, with the
// hardware's shape rules checked), so the layout and loop logic run against the fp32 reference on
// any CPU with AVX512-BF16 (tests), and the real instructions only on AMX hosts (amx_state below).
// One part of the CPU kernel's single translation unit: dual_sparse_cpu.cpp includes them all.
#pragma once

#include "common.h"
#include "prefetch.h"
#include "decode_avx512_permute.h"

#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <mutex>
#include <stdexcept>

namespace {

// The panel walk's ISA plus the AMX tile and bf16 instructions. GCC emits AMX instructions only
// from the explicit asm below, so the emulated instantiation of the same template runs on any CPU
// with the panel walk's ISA.
#define DS_AMX                                                                                              \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq,avx512bitalg,avx512bf16,popcnt,amx-tile," \
                        "amx-bf16")))

// ldtilecfg's 64-byte operand, palette 1 (Intel SDM vol. 2, LDTILECFG): bytes 16-47 the bytes per
// row of tiles 0-15, bytes 48-63 their rows; an unused tile has 0 and 0.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// The tiles of the panel multiply: 0-3 the sums of 4 row groups (tokens x 16 rows of fp32), 4 the
// inputs (tokens x 16 pairs), 5 and 6 the panel (16 pairs x 16 rows), alternated so that a load
// can overlap the multiply before it.
constexpr int kTileA = 4, kTileB0 = 5, kTileB1 = 6;
inline TileConfig panel_tile_config(int tokens) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) c.rows[t] = static_cast<uint8_t>(tokens), c.colsb[t] = 64;
  c.rows[kTileA] = static_cast<uint8_t>(tokens), c.colsb[kTileA] = 64;
  c.rows[kTileB0] = c.rows[kTileB1] = 16, c.colsb[kTileB0] = c.colsb[kTileB1] = 64;
  return c;
}

// The instructions. Own asm rather than GCC's _tile_* macros: those declare no memory operand for
// tileloadd (GCC may then move or delete the panel's stores, which nothing else reads) and only 8
// of ldtilecfg's 64 bytes. Tile numbers are part of the instruction, hence one asm per tile.
#define DS_TILE_CASES(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6)
struct AmxTiles {
  DS_AMX static void configure(const TileConfig& c) { __asm__ volatile("ldtilecfg %0" ::"m"(c) : "memory"); }
  DS_AMX static void release() { __asm__ volatile("tilerelease" ::: "memory"); }
  template <int N>
  DS_AMX static void load(const void* base, int64_t stride) {
#define DS_TILE_LOAD(n) \
  if constexpr (N == n) __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #n ::"r"(base), "r"(stride) : "memory");
    DS_TILE_CASES(DS_TILE_LOAD)
#undef DS_TILE_LOAD
  }
  template <int N>
  DS_AMX static void store(void* base, int64_t stride) {
#define DS_TILE_STORE(n) \
  if constexpr (N == n) __asm__ volatile("tilestored %%tmm" #n ", (%0,%1,1)" ::"r"(base), "r"(stride) : "memory");
    DS_TILE_CASES(DS_TILE_STORE)
#undef DS_TILE_STORE
  }
  template <int C, int B>  // tile C += tile A (kTileA) . tile B
  DS_AMX static void dot() {
    static_assert(C < 4 && (B == kTileB0 || B == kTileB1), "sums in tiles 0-3, the panel in 5 or 6");
#define DS_TILE_DOT(c, b) \
  if constexpr (C == c && B == b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm4, %%tmm" #c ::: "memory");
    DS_TILE_DOT(0, 5) DS_TILE_DOT(1, 5) DS_TILE_DOT(2, 5) DS_TILE_DOT(3, 5)
    DS_TILE_DOT(0, 6) DS_TILE_DOT(1, 6) DS_TILE_DOT(2, 6) DS_TILE_DOT(3, 6)
#undef DS_TILE_DOT
  }
};
#undef DS_TILE_CASES

// The same operations in scalar C++ (Intel SDM's pseudocode of TILELOADD, TILESTORED and
// TDPBF16PS: per pair, two fp32 products added to the sum one after the other), with the checks the
// hardware makes (a configured tile, rows <= 16, 64 bytes a row, matching shapes of a multiply), so
// that a shape the instructions would fault on fails here too, with a message.
struct EmulatedTiles {
  struct State {
    TileConfig config;
    bool configured = false;
    alignas(64) uint8_t tiles[8][16][64];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  static void require(bool ok, const char* what) {
    if (!ok) throw std::logic_error(std::string("emulated AMX: ") + what);
  }
  static void configure(const TileConfig& c) {
    State& s = state();
    require(c.palette == 1, "palette must be 1");
    for (int t = 0; t < 8; ++t) require(c.rows[t] <= 16 && c.colsb[t] <= 64, "a tile is at most 16 rows of 64 bytes");
    s.config = c;
    s.configured = true;
    std::memset(s.tiles, 0, sizeof(s.tiles));
  }
  static void release() { state().configured = false; }
  static int rows(int n) { return state().config.rows[n]; }
  static int colsb(int n) { return state().config.colsb[n]; }
  template <int N>
  static void load(const void* base, int64_t stride) {
    State& s = state();
    require(s.configured && rows(N) > 0, "load of an unconfigured tile");
    for (int r = 0; r < rows(N); ++r)
      std::memcpy(s.tiles[N][r], static_cast<const char*>(base) + r * stride, colsb(N));
  }
  template <int N>
  static void store(void* base, int64_t stride) {
    State& s = state();
    require(s.configured && rows(N) > 0, "store of an unconfigured tile");
    for (int r = 0; r < rows(N); ++r) std::memcpy(static_cast<char*>(base) + r * stride, s.tiles[N][r], colsb(N));
  }
  template <int C, int B>
  static void dot() {
    State& s = state();
    const int M = rows(C), Nc = colsb(C) / 4, Kp = colsb(kTileA) / 4;
    require(s.configured && M > 0, "multiply into an unconfigured tile");
    require(rows(kTileA) == M && colsb(B) == colsb(C) && rows(B) == Kp,
            "tdpbf16ps shapes: A rows = C rows, B rows = A bytes / 4, B bytes = C bytes");
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < Kp; ++k) {
        uint16_t a[2], b[2];
        std::memcpy(a, s.tiles[kTileA][m] + 4 * k, 4);
        for (int n = 0; n < Nc; ++n) {
          std::memcpy(b, s.tiles[B][k] + 4 * n, 4);
          float sum;
          std::memcpy(&sum, s.tiles[C][m] + 4 * n, 4);
          sum += bf16_to_float(a[0]) * bf16_to_float(b[0]);
          sum += bf16_to_float(a[1]) * bf16_to_float(b[1]);
          std::memcpy(s.tiles[C][m] + 4 * n, &sum, 4);
        }
      }
  }
};

// Active columns per K-chunk: 512 (a multiple of the inputs' 64-column chunks) make a 128 KiB
// panel (256 pairs x 8 row groups x 64 bytes), decoded once and multiplied with every token while
// it sits in L2 (2 MiB a core on Sapphire Rapids); the sums go back to the block's scratch once a
// chunk.
constexpr int64_t AMX_K_COLUMNS = 512;
static_assert(AMX_K_COLUMNS % PANEL_COLUMNS == 0, "a K-chunk is whole input chunks");

template <class Tiles, int Q>  // the 4 row groups of 64-row quarter... half Q of the block
DS_AMX inline void multiply_half(const __m512i* panel, int64_t steps, const uint32_t* x_chunks, int64_t T,
                                 int64_t t0, int64_t kc0, float* out) {
  constexpr int64_t C_STRIDE = R * sizeof(float);            // one token's row of the [T, R] sums
  constexpr int64_t B_STRIDE = 2 * WORDS * sizeof(__m512i);  // one pair of the panel: 8 row groups
  float* c = out + t0 * R + 64 * Q;
  Tiles::template load<0>(c, C_STRIDE);
  Tiles::template load<1>(c + 16, C_STRIDE);
  Tiles::template load<2>(c + 32, C_STRIDE);
  Tiles::template load<3>(c + 48, C_STRIDE);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t j = kc0 + 32 * s;  // first active column of this step
    const uint32_t* a = x_chunks + ((j / PANEL_COLUMNS) * T + t0) * (PANEL_COLUMNS / 2) + (j % PANEL_COLUMNS) / 2;
    Tiles::template load<kTileA>(a, PANEL_COLUMNS * 2);
    const __m512i* b = panel + 2 * WORDS * 16 * s + 4 * Q;
    Tiles::template load<kTileB0>(b, B_STRIDE);
    Tiles::template dot<0, kTileB0>();
    Tiles::template load<kTileB1>(b + 1, B_STRIDE);
    Tiles::template dot<1, kTileB1>();
    Tiles::template load<kTileB0>(b + 2, B_STRIDE);
    Tiles::template dot<2, kTileB0>();
    Tiles::template load<kTileB1>(b + 3, B_STRIDE);
    Tiles::template dot<3, kTileB1>();
  }
  Tiles::template store<0>(c, C_STRIDE);
  Tiles::template store<1>(c + 16, C_STRIDE);
  Tiles::template store<2>(c + 32, C_STRIDE);
  Tiles::template store<3>(c + 48, C_STRIDE);
}

// out [T, R] (zeroed) += row block rb of W (the active columns) times the inputs (p.xpairs).
template <class Tiles>
DS_AMX void block_amx_panel(const Problem& p, int64_t rb, float* out) {
  // 128 KiB a thread, aligned by hand (std::vector<__m512i> was not 64-byte aligned here)
  thread_local std::vector<uint8_t> panel_store(AMX_K_COLUMNS / 2 * 2 * WORDS * sizeof(__m512i) + 64);
  __m512i* panel = reinterpret_cast<__m512i*>((reinterpret_cast<uintptr_t>(panel_store.data()) + 63) & ~uintptr_t{63});
  const bool two_halves = block_rows(p, rb) > 64;
  int configured = 0;  // tokens the tiles are configured for
  for (int64_t kc0 = 0; kc0 < p.n_active; kc0 += AMX_K_COLUMNS) {
    const int64_t kc1 = std::min(p.n_active, kc0 + AMX_K_COLUMNS);
    decode_pair_panel(p, rb, kc0, kc1, panel, true);
    const int64_t n_pairs = (kc1 - kc0 + 1) / 2, steps = (n_pairs + 15) / 16;
    // the last step's pairs past the columns multiply zero inputs: zero them too (0 x NaN is NaN)
    for (int64_t i = 2 * WORDS * n_pairs; i < 2 * WORDS * 16 * steps; ++i) panel[i] = _mm512_setzero_si512();
    for (int64_t t0 = 0; t0 < p.T; t0 += 16) {
      const int tokens = static_cast<int>(std::min<int64_t>(16, p.T - t0));
      if (tokens != configured) {
        Tiles::configure(panel_tile_config(tokens));
        configured = tokens;
      }
      multiply_half<Tiles, 0>(panel, steps, p.xpairs, p.T, t0, kc0, out);
      if (two_halves) multiply_half<Tiles, 1>(panel, steps, p.xpairs, p.T, t0, kc0, out);
    }
  }
  if (configured) Tiles::release();
}

}  // namespace
