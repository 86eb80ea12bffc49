"""The walk's software-prefetch settings against each other in one process, weights from DRAM,
alternated over rounds (for hosts whose memory timings drift between runs: medians, not one run).

    python scripts/prefetch_ab.py 11008x4096 0,0 16,3 48,3 96,3 48,2

Each setting is "ahead,lines" as for DUOSERVE_CPU_PREFETCH (0,0: none). bf16, p_w = p_x = 0.5, one
token, one thread; each call runs on the next of enough packed copies of the weight to fill 512 MiB.
Prints the median and the best per-call time of 8 rounds for each setting.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from duoserve.kernels import cpu, pack_dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="NxK")
    parser.add_argument("settings", nargs="+", help="ahead,lines")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    n, k = map(int, args.shape.lower().split("x"))
    settings = [tuple(int(v) for v in s.split(",")) for s in args.settings]
    if any(len(s) != 2 for s in settings):
        parser.error("each setting is ahead,lines (e.g. 48,3)")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < 0.5] = 0
    first = pack_dense(w.bfloat16())
    packs = [first] + [pack_dense(w.bfloat16()) for _ in range(max(1, (512 << 20) // first.nbytes() - 1))]
    x = torch.randn(1, k, generator=gen).bfloat16()
    threshold = torch.tensor(float(x.float().abs().quantile(0.5)))

    def per_call() -> float:
        start = time.perf_counter()
        for p in packs:
            cpu.spmspv(x, p.bitmap, p.offsets, p.values, threshold, None, n)
        return (time.perf_counter() - start) / len(packs)

    saved = cpu.prefetch()
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    try:
        for _ in range(args.rounds):
            for s in settings:
                cpu.set_prefetch(*s)
                per_call()  # one pass to settle
                times[s].append(per_call())
    finally:
        cpu.set_prefetch(*saved)
    print(f"# {n}x{k}, bf16, p_w = p_x = 0.5, 1 token, {len(packs)} copies, {args.rounds} rounds, "
          f"decoder {cpu.decoder(torch.bfloat16)}; load average {__import__('os').getloadavg()}")
    for s in settings:
        print(f"prefetch {s[0]},{s[1]}: median {statistics.median(times[s]) * 1e3:.2f} ms, "
              f"best {min(times[s]) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
