"""torch.matmul's rate in fp32 and bf16 on this CPU, one thread, by batch (tokens), warm weights.

    python scripts/torch_gemm_rates.py

On CPUs without AVX512-BF16 torch's bf16 matmul is no real GEMM (a Zen 3 host, torch 2.13: about
9-10 GFLOP/s at any batch, fp32 55-64 at 64-384 tokens), which is why the CPU kernel's tiled path
multiplies bf16 in fp32 there (kernels/csrc: cpu_has_fast_bf16_gemm). Prints GFLOP/s per point,
the best of a few calls.
"""
from __future__ import annotations

import time

import torch

SHAPES = [(4096, 11008), (1536, 576)]
BATCHES = (1, 4, 16, 64, 384)


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in SHAPES:
            w = torch.randn(n, k, generator=gen).to(dtype)
            points = []
            for m in BATCHES:
                x = torch.randn(m, k, generator=gen).to(dtype)
                seconds = best_seconds(lambda: torch.matmul(x, w.t()), 3 if n * k > 1 << 22 else 10)
                points.append(f"{m} tokens {seconds * 1e3:.2f} ms ({2 * m * n * k / seconds / 1e9:.1f} GFLOP/s)")
            print(f"{str(dtype).removeprefix('torch.')} {n}x{k}: " + " | ".join(points), flush=True)


if __name__ == "__main__":
    main()
