// Whether bf16 calls take the AMX panel path (amx_panel.h): the CPU and the OS allow it, the
// instructions passed a self-check, and from how many tokens (measured once per process).
// One part of the CPU kernel's single translation unit: dual_sparse_cpu.cpp includes them all.
#pragma once

#include "dispatch.h"

#include <cerrno>

namespace {

// What run_block runs for a call that set up pair inputs (Problem::amx).
enum AmxKind : int { kNoAmx = 0, kAmxTiles = 1, kAmxEmulated = 2 };

// CPUID.(7, 0).EDX: AMX-BF16 (bit 22), AMX-TILE (24); XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA):
// the OS manages the state. Then Linux (5.16+) wants a per-process request before the first tile
// instruction (kernels/cpu_features.py says why); asking twice is harmless.
bool cpu_has_amx_isa() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 22 & 1) && (d >> 24 & 1) && os_saves_state(0x60000) && cpu_has_bf16_dot();
}

bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// A problem with every irregularity the path meets: 2 row blocks (the second of 72 rows: one full
// and one partial 64-row half), 601 columns of which every 7th is inactive (two K-chunks, the last
// with an odd number of columns), 19 tokens (a full and a partial token block), p_w ~0.5, values
// and inputs in [-1, 1). Runs block_amx_panel<Tiles> on it and returns the largest difference from
// an fp32 reference, relative to the largest |y|.
template <class Tiles>
double amx_probe_error() {
  constexpr int64_t NB = 2, N = R + 72, K = 601, T = 19;
  Xorshift rng{0xD1B54A32D192ED03ull};
  const SyntheticIndex index = synthetic_index(NB, K, rng);
  auto uniform = [&rng]() { return static_cast<float>(static_cast<int64_t>(rng.next() >> 40) - (1 << 23)) / (1 << 23); };
  std::vector<uint16_t> values(index.nnz + R, 0);
  for (int64_t i = 0; i < index.nnz; ++i) values[i] = float_to_bf16(uniform());
  std::vector<int32_t> active;
  for (int64_t k = 0; k < K; ++k)
    if (k % 7 != 3) active.push_back(static_cast<int32_t>(k));
  const int64_t A = static_cast<int64_t>(active.size());
  std::vector<uint16_t> x(T * K);
  for (auto& v : x) v = float_to_bf16(uniform());
  std::vector<uint32_t> xpairs((A + PANEL_COLUMNS - 1) / PANEL_COLUMNS * T * (PANEL_COLUMNS / 2), 0u);
  uint16_t* xp = reinterpret_cast<uint16_t*>(xpairs.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < A; ++j)
      xp[((j / PANEL_COLUMNS) * T + t) * PANEL_COLUMNS + j % PANEL_COLUMNS] = x[t * K + active[j]];
  std::vector<float> y(T * N, 0.f), ref(T * N, 0.f);
  for (int64_t rb = 0; rb < NB; ++rb)
    for (int64_t j = 0; j < A; ++j) {
      const int64_t col = rb * K + active[j];
      int64_t v = index.offsets[col];
      for (int64_t w = 0; w < WORDS; ++w)
        for (uint32_t m = static_cast<uint32_t>(index.bitmap[col * WORDS + w]); m; m &= m - 1, ++v) {
          const int64_t row = rb * R + 32 * w + __builtin_ctz(m);
          if (row >= N) continue;
          for (int64_t t = 0; t < T; ++t) ref[t * N + row] += bf16_to_float(values[v]) * bf16_to_float(x[t * K + active[j]]);
        }
    }
  Problem p{index.bitmap.data(), index.offsets.data(), values.data(), active.data(), A, nullptr, T, K, N, y.data()};
  p.xpairs = xpairs.data();
  p.pairs = PANEL_COLUMNS / 2;
  std::vector<float> scratch(T * R + 16);
  float* out = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t{63});
  for (int64_t rb = 0; rb < NB; ++rb) {
    std::fill(out, out + T * R, 0.f);
    block_amx_panel<Tiles>(p, rb, out);
    store_block(p, rb, 0, T, out);
  }
  double worst = 0, scale = 1e-30;
  for (int64_t i = 0; i < T * N; ++i) {
    worst = std::max(worst, static_cast<double>(std::fabs(y[i] - ref[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(ref[i])));
  }
  return worst / scale;
}
constexpr double kAmxProbeTolerance = 1e-5;  // fp32 sums of exact products, in another order

// The instructions' self-check, in a child process: a wrong tile configuration faults (SIGILL or
// SIGSEGV) and would take the server with it, so the parent only learns whether the child ran the
// probe to a correct result. The child runs no threads, touches no Python and ends with _exit.
bool amx_self_check(std::string& why) {
  const pid_t pid = fork();
  if (pid == 0) {
    double err = 1;
    try {
      err = amx_probe_error<AmxTiles>();
    } catch (...) {
    }
    _exit(err <= kAmxProbeTolerance ? 0 : 2);
  }
  if (pid < 0) {
    why = std::string("could not fork the AMX self-check: ") + std::strerror(errno);
    return false;
  }
  int status = 0;
  pid_t waited;
  while ((waited = waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
  }
  if (waited != pid) {  // e.g. a process-wide SIGCHLD reaper took the child's status first
    why = std::string("could not wait for the AMX self-check: ") + std::strerror(errno);
    return false;
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return true;
  why = WIFSIGNALED(status) ? "the AMX self-check died of signal " + std::to_string(WTERMSIG(status))
                            : std::string("the AMX self-check's result differed from the fp32 reference");
  return false;
}

struct AmxAvailability {
  bool ok = false;
  std::string why;  // why not, or what ran
};

const AmxAvailability& amx_availability() {
  static const AmxAvailability a = [] {
    AmxAvailability r;
    if (!cpu_has_amx_isa()) {
      r.why = "the CPU or OS lacks AMX-BF16 / AMX-TILE (or the panel walk's AVX-512 BF16)";
    } else if (!request_amx_permission()) {
      r.why = std::string("Linux refused AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM): ") + std::strerror(errno);
    } else if (amx_self_check(r.why)) {
      r.ok = true;
      r.why = "AMX-BF16 tiles, self-check passed";
    }
    return r;
  }();
  return a;
}

// -1 auto (the instructions where available), 0 off, 1 on (set_amx refuses it where unavailable),
// 2 emulated (tests: the same path with scalar tile operations, on any CPU with the panel walk's ISA).
int64_t g_amx_request = -1;
// AMX from this many tokens; -1: measured (instructions) or 1 (emulated).
int64_t g_amx_min_tb = -1;

AmxKind amx_kind() {
  if (g_amx_request == 0) return kNoAmx;
  if (g_amx_request == 2) return cpu_has_bf16_dot() ? kAmxEmulated : kNoAmx;
  return amx_availability().ok ? kAmxTiles : kNoAmx;
}

// From how many tokens the AMX path beats the walks, measured once on the same in-cache synthetic
// call as the panel walk's cutover (8 row blocks x 512 columns, p_w ~0.5, all columns active): the
// first of 2 and 3 tokens where it is faster, else 4 (from 4 tokens the walks multiply on SIMD units
// at up to 2.4x the 1-token time, docs/kernels.md).
int64_t measure_amx_min_tokens() {
  const Decoder d = active_decoder(true);
  for (int64_t T = 2; T <= 3; ++T) {
    SyntheticCall call(8, 512, T, true, 0x94D049BB133111EBull);
    Problem amx = call.panel();
    amx.amx = kAmxTiles;
    if (second_is_faster(call.walk, d, amx, d, true)) return T;
  }
  return 4;
}

int64_t amx_min_tokens() {
  if (g_amx_min_tb >= 1) return g_amx_min_tb;
  if (amx_kind() != kAmxTiles) return 1;
  static const int64_t measured = measure_amx_min_tokens();  // thread-safe, once per process
  return measured;
}

// What a bf16 call of T tokens with decoder d runs on: kNoAmx, or the tiles (real or emulated).
AmxKind amx_kind_for(int64_t T, Decoder d) {
  if (d == Decoder::kScalar) return kNoAmx;
  const AmxKind kind = amx_kind();
  return kind != kNoAmx && T >= amx_min_tokens() ? kind : kNoAmx;
}

}  // namespace
