"""The kernel benchmark with vLLM's own dense CPU GEMM as the baseline.

    python -m duoserve.loaders.kernel_bench --bar --cold-mib 512 --baseline vllm

Same options as `python -m duoserve.kernels.bench`, plus `--baseline vllm`: x @ W.T through the GEMM
that vLLM's dense linear layers run on CPU (oneDNN or the sgl kernel, weights pre-packed at load),
the fair dense baseline for a served model. kernels/ imports only torch (a boundary that
tests/test_boundaries.py enforces), so the vLLM baseline is passed in from here.
"""
from __future__ import annotations

from duoserve.kernels import bench
from duoserve.loaders.vllm_compat import dense_cpu_linear


def main(argv=None) -> None:
    bench.main(argv, extra_baselines={"vllm": ("vLLM CPU GEMM", dense_cpu_linear)},
               prog="duoserve.loaders.kernel_bench")


if __name__ == "__main__":
    main()
