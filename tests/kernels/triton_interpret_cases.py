"""Run the Triton kernels under TRITON_INTERPRET=1 on CPU tensors (small odd shapes); exit 1 on a
mismatch. Started as a subprocess by test_triton_interpret.py: the variable must be set before
triton is imported, and the rest of the pytest process must not see it."""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from duoserve.kernels import gpu  # noqa: E402
from duoserve.kernels.check import Case, grid, run_cases  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def decode(cfg):
    return lambda x, p, t, b: gpu.decode(x, p.bitmap, p.offsets, p.values, t, b, p.n, cfg=cfg)


def gemm(cfg):
    return lambda x, p, t, b: gpu.gemm(x, p.bitmap, p.offsets, p.values, t, b, p.n, cfg=cfg)


def tiled(x, p, t, b):
    return gpu.tiled(x, p.bitmap, p.offsets, p.values, t, b, p.n)


def main() -> int:
    assert gpu._kernels().INTERPRET
    torch.set_num_threads(1)
    # K = 300: two compaction chunks (256) and a partial one; K = 77: not a multiple of BK
    decode_cases = grid([1, 33, 130], [300], [1], [0.5], [0.5], DTYPES, thr_zero=False)
    decode_cases += [Case(33, 77, 3, pw, px, torch.bfloat16) for pw, px in
                     [(0.0, 0.0), (0.9, 0.5), (1.0, 0.5), (0.5, 1.0)]]
    decode_cases += [Case(130, 300, 5, 0.5, 0.5, torch.float16, bias=False),
                     Case(33, 77, 2, 0.5, 0.0, torch.float32, thr_zero=True)]
    gemm_cases = grid([33, 130], [77], [17], [0.5], [0.5], DTYPES, thr_zero=False)
    gemm_cases += [Case(1, 300, 3, 0.9, 0.5, torch.bfloat16), Case(130, 300, 20, 1.0, 0.0, torch.float16),
                   Case(33, 77, 17, 0.5, 1.0, torch.float32, bias=False)]
    failures = run_cases(decode({"kind": "compact", "BK": 8, "num_warps": 4}), decode_cases, "cpu")
    failures += run_cases(decode({"kind": "compact", "BK": 16, "num_warps": 2}), decode_cases, "cpu")
    loop = {"kind": "loop", "BK": 8, "CPS": 2, "num_warps": 4}
    failures += run_cases(decode(loop), decode_cases[:4], "cpu")
    # the pipelined loop: K = 300 and 77 give programs with 0, 1, 2 and more tiles (prologue only,
    # partial pipelines, tails)
    for pipe in ({"kind": "pipe", "BK": 8, "CPS": 2, "num_warps": 2},
                 {"kind": "pipe", "BK": 16, "CPS": 1, "num_warps": 2}):
        failures += run_cases(decode(pipe), decode_cases, "cpu")
    # the one-launch decode (in-register compaction by a sort; chunks of 128 and 256 columns);
    # run twice, since its workspace must be left zeroed for the next call
    fused = {"kind": "fused", "C": 128, "BK": 32, "num_warps": 4}
    fused_cfgs = [fused, {**fused, "C": 256, "BK": 64}]
    for cfg in fused_cfgs:
        failures += run_cases(decode(cfg), decode_cases, "cpu") + run_cases(decode(cfg), decode_cases, "cpu")
    failures += run_cases(gemm({"BK": 32, "SPLIT": 1, "num_warps": 4}), gemm_cases, "cpu")
    failures += run_cases(gemm({"BK": 32, "SPLIT": 3, "num_warps": 4}), gemm_cases[:2], "cpu")
    # the tiled path: one chunk, then a scratch of one row block (N = 300: three chunks, the last
    # one partial; the bias sliced per chunk)
    failures += run_cases(tiled, gemm_cases, "cpu")
    scratch, gpu.SCRATCH_BYTES = gpu.SCRATCH_BYTES, 77 * 128 * 2
    chunked = [Case(300, 77, 9, 0.5, 0.5, torch.bfloat16), Case(300, 77, 17, 0.5, 0.5, torch.float32),
               Case(130, 77, 12, 0.9, 0.5, torch.float16, bias=False)]
    failures += run_cases(tiled, chunked, "cpu")
    gpu.SCRATCH_BYTES = scratch
    for f in failures:
        print("FAIL", f)
    runs = (4 + 2 * len(fused_cfgs)) * len(decode_cases) + 2 * len(gemm_cases) + 2 + len(chunked)
    print(f"{runs} cases, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
