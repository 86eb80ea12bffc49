"""The walk's software-prefetch settings against each other in one process, weights from DRAM,
alternated over rounds, each setting first in turn (for hosts whose memory timings drift between runs: medians, not one run).

    python scripts/prefetch_ab.py 11008x4096 0,0 16,3 48,3 96,3 stream,1024 stream,4096 default

Each setting is "ahead,lines" (the column prefetch) or "stream,BYTES" as for DUOSERVE_CPU_PREFETCH
(0,0: none), or "default" (what runs without settings). bf16, p_w = 0.5, p_x = --px (0.5), one
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
    parser.add_argument("settings", nargs="+", help="ahead,lines, stream,bytes or default")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--px", type=float, default=0.5, help="activation sparsity: the threshold's quantile of |x|")
    args = parser.parse_args()
    n, k = map(int, args.shape.lower().split("x"))
    try:
        settings = {text: cpu.DEFAULT_PREFETCH if text == "default" else cpu.parse_prefetch(text)
                    for text in args.settings}
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < 0.5] = 0
    first = pack_dense(w.bfloat16())
    packs = [first] + [pack_dense(w.bfloat16()) for _ in range(max(1, (512 << 20) // first.nbytes() - 1))]
    x = torch.randn(1, k, generator=gen).bfloat16()
    threshold = torch.tensor(float(x.float().abs().quantile(args.px)))

    def per_call() -> float:
        start = time.perf_counter()
        for p in packs:
            cpu.spmspv(x, p.bitmap, p.offsets, p.values, threshold, None, n)
        return (time.perf_counter() - start) / len(packs)

    saved = cpu.prefetch()
    times: dict[str, list[float]] = {text: [] for text in settings}
    try:
        order = list(settings.items())
        for r in range(args.rounds):
            for text, s in order[r % len(order):] + order[:r % len(order)]:  # each setting first in turn
                cpu.set_prefetch(*s)
                per_call()  # one pass to settle
                times[text].append(per_call())
    finally:
        cpu.set_prefetch(*saved)
    print(f"# {n}x{k}, bf16, p_w = 0.5, p_x = {args.px}, 1 token, {len(packs)} copies, {args.rounds} rounds, "
          f"decoder {cpu.decoder(torch.bfloat16)}; load average {__import__('os').getloadavg()}")
    for text in settings:
        print(f"prefetch {text}: median {statistics.median(times[text]) * 1e3:.2f} ms, "
              f"best {min(times[text]) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
