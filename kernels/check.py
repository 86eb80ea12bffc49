"""Correctness cases shared by the tests (CPU, Triton interpreter) and the GPU check script.

Every case compares an implementation against an fp32 dense computation on the same inputs:

    ref[t, n] = sum_k W[n, k] * xm[t, k] + bias[n]   in fp32, xm = where(|x| > thr, x, 0)

and passes when |y - ref| <= rtol * |ref| + mtol * mag with mag = |xm| @ |W|^T + |bias| (the size of
the terms, which bounds the accumulation error) and (rtol, mtol) per dtype in TOLERANCES. Outputs
must be NaN-free.

    python -m duoserve.kernels.check --device cuda      # all paths on a GPU, exit 1 on failure
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
from dataclasses import dataclass

import torch

from . import cli_args
from .layout import pack_dense

log = logging.getLogger(__name__)
TOLERANCES = {  # (rtol, mtol): about two units in the last place of the output dtype
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2.0**-7, 2.0**-8),
    torch.float16: (2.0**-9, 2.0**-10),
}


@dataclass(frozen=True)
class Case:
    n: int
    k: int
    t: int
    p_w: float
    p_x: float  # fraction of inputs under the threshold; 1.0 means threshold = inf
    dtype: torch.dtype
    bias: bool = True
    thr_zero: bool = False  # threshold 0 instead of the p_x quantile

    def __str__(self):
        thr = "0" if self.thr_zero else f"p_x={self.p_x}"
        return (f"N={self.n} K={self.k} T={self.t} p_w={self.p_w} {thr} "
                f"{str(self.dtype).replace('torch.', '')} bias={self.bias}")


def make_inputs(case: Case, device, seed: int = 0):
    """-> (x [T, K], dense W [N, K] with zeros, threshold fp32 0-dim, bias [N] | None)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(case.n, case.k, generator=g)  # [N, K]
    w[torch.rand(case.n, case.k, generator=g) < case.p_w] = 0
    x = torch.randn(case.t, case.k, generator=g)  # [T, K]
    x[torch.rand(case.t, case.k, generator=g) < 0.05] = 0  # exact zeros: dropped even at thr 0
    if case.thr_zero:
        thr = 0.0
    elif case.p_x >= 1.0:
        thr = float("inf")
    else:
        thr = float(torch.quantile(x.abs().flatten(), case.p_x)) if case.p_x > 0 else 0.0
    bias = torch.randn(case.n, generator=g) if case.bias else None
    cast = lambda a: a.to(device=device, dtype=case.dtype)  # noqa: E731
    return (cast(x), cast(w), torch.tensor(thr, dtype=torch.float32, device=device),
            None if bias is None else cast(bias))


def compare(y: torch.Tensor, x, w, thr, bias) -> str | None:
    """None if y matches the fp32 dense computation within the dtype's tolerance, else why not."""
    xm = torch.where(x.float().abs() > thr, x.float(), 0.0)  # [T, K] fp32
    ref = xm @ w.float().t()  # [T, N]
    mag = xm.abs() @ w.float().abs().t()
    if bias is not None:
        ref, mag = ref + bias.float(), mag + bias.float().abs()
    if y.shape != ref.shape or y.dtype != x.dtype:
        return f"shape/dtype {tuple(y.shape)} {y.dtype}, expected {tuple(ref.shape)} {x.dtype}"
    if torch.isnan(y).any():
        return "NaN in output"
    rtol, mtol = TOLERANCES[x.dtype]
    err = (y.float() - ref).abs()
    bound = rtol * ref.abs() + mtol * mag + 1e-30
    if (err > bound).any():
        worst = int((err - bound).argmax())
        return (f"max error {float(err.max()):.3g}; worst at {divmod(worst, ref.shape[1])}: "
                f"{float(y.flatten()[worst])} vs {float(ref.flatten()[worst])}")
    return None


def run_cases(impl, cases, device) -> list[str]:
    """impl(x, packed, thr, bias) -> y. Returns one line per failing case."""
    failures = []
    for case in cases:
        x, w, thr, bias = make_inputs(case, device)
        try:
            y = impl(x, pack_dense(w), thr, bias)
            why = compare(y, x, w, thr, bias)
        except Exception as exc:  # a crash is a failure of that case, the others still run
            why = f"{type(exc).__name__}: {exc}"
        if why:
            failures.append(f"{case}: {why}")
    return failures


def grid(ns, ks, ts, p_ws, p_xs, dtypes, thr_zero=True, bias=(True,)) -> list[Case]:
    cases = [Case(n, k, t, pw, px, dt, b) for n, k, t, pw, px, dt, b in
             itertools.product(ns, ks, ts, p_ws, p_xs, dtypes, bias)]
    if thr_zero:
        cases += [Case(n, k, t, 0.5, 0.0, dt, True, True) for n, k, t, dt in
                  itertools.product(ns, ks, ts, dtypes)]
    return cases


def _fit(cfg: dict, t: int) -> dict:
    """Shrink a decode config's BK so that BK * BLOCK_B stays a sane register tile."""
    block_b = 1 << max(0, (t - 1).bit_length())
    return {**cfg, "BK": max(1, min(cfg["BK"], 64 // block_b))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=cli_args.device, default="cuda", help="cpu, cuda or cuda:N")
    ap.add_argument("--quick", action="store_true",
                    help="a smaller grid (every kernel configuration still runs; for short GPU sessions)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from . import dual_sparse_linear, gpu

    dev = args.device
    gpu._TUNE = False  # every config must be right; the check pins two of each kernel below
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if dev.type == "cuda" else \
        [torch.bfloat16, torch.float32]
    # few distinct token counts: every (T bucket, dtype, config) is a Triton compile
    if args.quick:
        cases = grid([33, 971], [77, 4100], [1, 3, 8, 17], [0.5, 1.0], [0.5, 1.0], dtypes)
    else:
        cases = grid([1, 33, 971], [77, 4100], [1, 3, 8, 17, 64], [0.0, 0.5, 1.0], [0.0, 0.5, 1.0],
                     dtypes)
    cases += grid([33], [300], [1, 5], [0.9], [0.5], dtypes, thr_zero=False)
    cases += [Case(971, 300, t, 0.5, 0.5, dt, bias=False) for t in (1, 17) for dt in dtypes]
    impls = {"op": dual_sparse_linear}  # the tuned defaults behind the public API
    if dev.type == "cuda":  # plus one other configuration of each kernel (split-K, wide tiles)
        fused = {"kind": "fused", "C": 128, "BK": 32, "num_warps": 4}
        for cfg in ({"kind": "compact", "BK": 32, "num_warps": 8},
                    {"kind": "compact", "BK": 64, "num_warps": 4},
                    {"kind": "pipe", "BK": 16, "CPS": 2, "num_warps": 2},
                    fused, {**fused, "C": 256, "BK": 64, "num_warps": 8}):
            impls[f"decode {cfg}"] = lambda x, p, t, b, c=cfg: gpu.decode(
                x, p.bitmap, p.offsets, p.values, t, b, p.n, cfg=_fit(c, x.shape[0]))
        gcfg = {"BK": 64, "SPLIT": 4, "num_warps": 8}
        impls[f"gemm {gcfg}"] = lambda x, p, t, b: gpu.gemm(
            x, p.bitmap, p.offsets, p.values, t, b, p.n, cfg=gcfg)
        # the tiled path (the op takes it above 8 tokens only where it measures faster than GEMM)
        impls["tiled"] = lambda x, p, t, b: gpu.tiled(x, p.bitmap, p.offsets, p.values, t, b, p.n)
    total = 0
    for name, impl in impls.items():
        sel = [c for c in cases if not name.startswith("decode") or c.t <= 8]
        fails = run_cases(impl, sel, dev)
        if "fused" in name:  # its workspace must be zero again after every call: run them twice
            fails += run_cases(impl, sel, dev)
        total += len(fails)
        log.info("%s: %d cases, %d failures", name, len(sel), len(fails))
        for f in fails[:20]:
            log.info("  FAIL %s", f)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
