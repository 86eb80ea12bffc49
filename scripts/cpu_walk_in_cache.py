"""The spMspV walk alone on small weights that stay in cache: the decoding cost, without the memory
noise of DRAM timings (best of 300 calls each, one thread, p_w = p_x = 0.5).

    python scripts/cpu_walk_in_cache.py

To compare two builds of the kernel, run this with each built `.so` in turn, several rounds
alternated (how the AVX2 bf16 decoder change of 2026-11-29 was measured: docs/reports/cpu-2026-11-29-zen3-avx2).
"""
from __future__ import annotations

import time

import torch

from duoserve.kernels import cpu, pack_dense

CASES = [(1536, 576, 1, torch.bfloat16), (576, 1536, 1, torch.bfloat16), (1536, 576, 3, torch.bfloat16),
         (1536, 576, 1, torch.float32)]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = []
    for n, k, tokens, dtype in CASES:
        w = torch.randn(n, k)
        w[torch.rand(n, k) < 0.5] = 0
        packed = pack_dense(w.to(dtype))
        x = torch.randn(tokens, k).to(dtype)
        threshold = torch.tensor(float(x.float().abs().quantile(0.5)))

        def call():
            cpu.spmspv(x, packed.bitmap, packed.offsets, packed.values, threshold, None, n)

        for _ in range(20):
            call()
        best = float("inf")
        for _ in range(300):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        results.append(f"{n}x{k} {tokens} token(s) {str(dtype).removeprefix('torch.')}: {best * 1e6:.1f} us")
    print(f"decoder {cpu.decoder(torch.bfloat16)} | " + " | ".join(results))


if __name__ == "__main__":
    main()
