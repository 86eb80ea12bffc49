"""Benchmark: dual-sparse linear vs dense torch.matmul (MKL/oneDNN on CPU, cuBLAS on CUDA).

    python -m duoserve.kernels.bench                         # CPU, 1 thread, full sweep, bf16
    python -m duoserve.kernels.bench --bar                   # only the issue's bar points
    python -m duoserve.kernels.bench --device cuda --markdown docs/out.md
    python -m duoserve.kernels.bench --cutover               # every path per batch size (spMspV/decode, GEMM, tiled)
    python -m duoserve.kernels.bench --bar --cold-mib 512    # weights from DRAM, as in a real model
    python -m duoserve.kernels.bench --bar --cold-mib 512 --rounds 9   # ... medians of alternated rounds
    python -m duoserve.kernels.bench --device cuda --variants --shapes 11008x4096 --batch 1
                                                             # every decode kernel configuration
    python -m duoserve.loaders.kernel_bench --int4 --bar --cold-mib 512 --baseline vllm
                                                             # int4 dual-sparse vs torch's dense int4
                                                             # and vLLM's dense bf16 GEMM (bench_quant.py)

For every shape (N, K), weight sparsity p_w, activation sparsity p_x and batch B: random weights of
the real shape with a fraction p_w of zeros (speed depends on shapes and sparsity, not values),
inputs x ~ N(0, 1) [B, K] and the threshold at the p_x quantile of |x| (each token masks its own
columns). The dense baseline is measured in the same run on the same device. Reported: time per
call, speedup vs dense, and achieved bandwidth (bytes the kernel must read: dense = N*K*esize;
dual = the packed bytes of the columns active for some token) against the machine's copy bandwidth
measured at start. CPU timings: the fastest of at least 10 single calls (the machine may be
shared: the load average is printed). CUDA timings: CUDA-graph replays of 20 calls timed with
events.

Warm vs cold (CPU): by default every call reuses one weight, so a weight that fits the last-level
cache (the SmolLM2 shapes, 4096x4096 at 50%) is read from cache, not memory. In a model the weights
of all layers far exceed the cache and every matrix comes from DRAM: `--cold-mib M` times each call
on the next of enough copies of the weight to fill M MiB (dense and dual alike; best of 3 passes,
mean per call), which is what decode sees. On a host whose memory timings drift between runs,
`--rounds R` times dense and dual-sparse next to each other in R alternated rounds and reports the
medians (the speedup is the median of the per-round ratios).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import statistics
import time

import torch

from . import cli_args, cpu, dual_sparse_linear, gpu, pack_dense
from .layout import BLOCK_ROWS, PackedWeight
from .machine_info import cpu_model, machine  # noqa: F401 (bench_decode and scripts import them from here)

log = logging.getLogger(__name__)
SHAPES = {  # (N, K) = (out, in)
    "smollm2": [(576, 576), (1536, 576), (576, 1536)],
    "llama": [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)],
}
BAR_SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096), (4096, 11008)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Timer:
    """Seconds per call of fn() on the device.

    CPU: the fastest of >= 10 single calls (on a shared machine the minimum is the call that ran
    uncontended; dense and dual are timed the same way). CUDA: CUDA-graph replays of 20 calls,
    median of 10 replays timed with events."""

    def __init__(self, device: torch.device, min_time: float = 0.1):
        self.device, self.min_time = device, min_time

    def __call__(self, fn) -> float:
        if self.device.type == "cuda":
            return self._cuda(fn)
        fn()
        t0 = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t0, 1e-6)
        best = once
        for _ in range(max(10, min(400, int(self.min_time / once)))):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    def _cuda(self, fn) -> float:
        return gpu.time_call(fn)  # the tuner's own timing: CUDA-graph replays


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes read + written per second by a large tensor copy (the roofline we compare to)."""
    n = (256 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timer(lambda: dst.copy_(src))


def make_weight(n, k, p_w, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device, dtype=dtype)  # [N, K]
    w.masked_fill_(torch.rand(n, k, generator=g, device=device) < p_w, 0)
    return w


def make_input(b, k, p_x, dtype, device, seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, k, generator=g, device=device, dtype=torch.float32)  # [B, K]
    thr = float(torch.quantile(x[0].abs(), p_x)) if p_x > 0 else 0.0
    return x.to(dtype), torch.tensor(thr, dtype=torch.float32, device=device)


def torch_dense(w: torch.Tensor):
    """x -> x @ w.T through torch.matmul (MKL/oneDNN on CPU, cuBLAS on CUDA)."""
    return lambda x: torch.matmul(x, w.t())


# Dense baselines by --baseline name: (description for the report, factory w -> (x -> x @ w.T)).
# kernels/ imports only torch, so a baseline from another library (vLLM's pre-packed CPU GEMM) is
# passed in by its caller: `python -m duoserve.loaders.kernel_bench --baseline vllm`.
DENSE_BASELINES = {"torch": ("torch.matmul", torch_dense)}


def cold_time(fns, passes: int = 3) -> float:
    """Seconds per call when every call runs on a different copy (the working set exceeds the
    caches): best of `passes` passes over all copies, mean per call."""
    fns[0]()
    best = math.inf
    for _ in range(passes):
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        best = min(best, (time.perf_counter() - t0) / len(fns))
    return best


def alternated_cold_times(dense_fns, dual_fns, rounds: int) -> tuple[float, float, float]:
    """(dense s, dual s, speedup) per call for a host whose memory timings drift between runs:
    `rounds` rounds of one pass over the copies each, dense and dual alternately first; the medians
    of the times and of the per-round ratios (a drift then moves both sides of a ratio alike)."""
    dense_fns[0]()
    dual_fns[0]()
    dense, dual, ratios = [], [], []
    for r in range(rounds):
        times = {}
        for name in (("dense", "dual") if r % 2 == 0 else ("dual", "dense")):
            fns = dense_fns if name == "dense" else dual_fns
            t0 = time.perf_counter()
            for fn in fns:
                fn()
            times[name] = (time.perf_counter() - t0) / len(fns)
        dense.append(times["dense"])
        dual.append(times["dual"])
        ratios.append(times["dense"] / times["dual"])
    return statistics.median(dense), statistics.median(dual), statistics.median(ratios)


def copies(t: torch.Tensor | PackedWeight, cold_mib: float) -> list:
    """[t] plus clones of it filling about cold_mib MiB (just [t] when cold_mib is 0)."""
    nbytes = t.nbytes() if isinstance(t, PackedWeight) else t.numel() * t.element_size()
    count = max(2, math.ceil(cold_mib * 2**20 / nbytes)) if cold_mib else 1
    if isinstance(t, PackedWeight):
        return [t] + [PackedWeight(t.n, t.k, t.bitmap.clone(), t.offsets.clone(), t.values.clone())
                      for _ in range(count - 1)]
    return [t] + [t.clone() for _ in range(count - 1)]


def packed_bytes_read(w: torch.Tensor, x: torch.Tensor, thr: torch.Tensor) -> int:
    """Bytes of the packed layout in the columns active for some token (what the kernel reads)."""
    active = (x.float().abs() > thr).any(0)  # [K]
    nb = (w.shape[0] + BLOCK_ROWS - 1) // BLOCK_ROWS
    nnz = int(((w != 0) & active[None, :]).sum())
    return nnz * w.element_size() + int(active.sum()) * nb * (BLOCK_ROWS // 8 + 4)


def _md_row(r: dict) -> str:
    return (f"| {r['n']}x{r['k']} | {r['p_w']} | {r['p_x']} | {r['batch']} | {r['dense_us']:.1f} | "
            f"{r['dual_us']:.1f} | **{r['speedup']:.2f}x** | {100 * r['dense_bw']:.0f}% | "
            f"{100 * r['dual_bw']:.0f}% |")


def run_sweep(args, device, timer, bw, sink) -> list[dict]:
    """Every point of the grid; each result row is also written to `sink` (markdown) at once."""
    rows = []
    dtype = DTYPES[args.dtype]
    dense_cache: dict[tuple, float] = {}

    def emit(n, k, p_w, p_x, b, w, x, thr, packed, t_dense, t, speedup):
        moved = packed_bytes_read(w, x, thr)
        row = dict(n=n, k=k, p_w=p_w, p_x=p_x, batch=b, dense_us=t_dense * 1e6, dual_us=t * 1e6,
                   speedup=speedup, dense_bw=n * k * w.element_size() / t_dense / bw,
                   dual_bw=moved / t / bw, bpe=packed.bytes_per_element())
        rows.append(row)
        sink(_md_row(row))
        print(f"{n:>6}x{k:<6} p_w={p_w:.1f} p_x={p_x:.1f} B={b:<3} dense {row['dense_us']:9.1f} us"
              f"  dual {row['dual_us']:9.1f} us  x{row['speedup']:5.2f}"
              f"  bw dense {100 * row['dense_bw']:5.1f}% dual {100 * row['dual_bw']:5.1f}%"
              f" of copy", flush=True)
    for n, k in args.shapes:
        for p_w in args.pw:
            w = make_weight(n, k, p_w, dtype, device)
            packed = pack_dense(w)
            cold = args.cold_mib and device.type == "cpu"
            ws, ps = (copies(w, args.cold_mib), copies(packed, args.cold_mib)) if cold else ([w], [packed])
            for b in args.batch:
                key = (n, k, b)
                if cold and args.rounds > 1:  # dense timed again next to each point
                    x0, _ = make_input(b, k, 0.0, dtype, device)
                    dense_fns = [args.dense(w) for w in ws]
                    for p_x in args.px:
                        x, thr = make_input(b, k, p_x, dtype, device)
                        t_dense, t, speedup = alternated_cold_times(
                            [lambda f=f: f(x0) for f in dense_fns],
                            [lambda p=p: dual_sparse_linear(x, p, thr) for p in ps], args.rounds)
                        emit(n, k, p_w, p_x, b, w, x, thr, packed, t_dense, t, speedup)
                    del dense_fns
                    continue
                if key not in dense_cache:
                    x, _ = make_input(b, k, 0.0, dtype, device)
                    dense_fns = [args.dense(w) for w in ws]
                    dense_cache[key] = (cold_time([lambda f=f: f(x) for f in dense_fns]) if cold
                                        else timer(lambda: dense_fns[0](x)))
                    del dense_fns
                for p_x in args.px:
                    x, thr = make_input(b, k, p_x, dtype, device)
                    t = (cold_time([lambda p=p: dual_sparse_linear(x, p, thr) for p in ps]) if cold
                         else timer(lambda: dual_sparse_linear(x, packed, thr)))
                    emit(n, k, p_w, p_x, b, w, x, thr, packed, dense_cache[key], t, dense_cache[key] / t)
            del w, packed, ws, ps
    return rows


def half_sparse_points(args, device):
    """(n, k, dense w, packed w, batch, x, threshold) for every shape and batch at p_w = p_x = 0.5."""
    dtype = DTYPES[args.dtype]
    for n, k in args.shapes:
        w = make_weight(n, k, 0.5, dtype, device)
        p = pack_dense(w)
        for b in args.batch:
            x, thr = make_input(b, k, 0.5, dtype, device)
            yield n, k, w, p, b, x, thr


def run_cutover(args, device, timer, sink) -> list[dict]:
    """Per batch size, at p_w = p_x = 0.5: every path against dense (picks the cutovers).
    CPU: spMspV vs the tiled path. CUDA: decode (T <= 8) vs GEMM vs tiled."""
    rows = []
    amx_mode = cpu.amx()[0] if device.type == "cpu" and cpu.available() else "off"
    if amx_mode == "tiles":
        cpu.set_amx("off")  # the spMspV column: the walks / panel walk; the AMX column turns it on
    for n, k, w, p, b, x, thr in half_sparse_points(args, device):
        op_args = (x, p.bitmap, p.offsets, p.values, thr, None, n)
        dense = timer(lambda: torch.matmul(x, w.t()))
        if device.type == "cuda":
            paths = {"decode": timer(lambda: gpu.decode(*op_args)) if b <= gpu.DECODE_MAX_TOKENS else float("nan"),
                     "gemm": timer(lambda: gpu.gemm(*op_args)),
                     "tiled": timer(lambda: gpu.tiled(*op_args))}
        else:
            paths = {"spmspv": timer(lambda: cpu.spmspv(*op_args)), "tiled": timer(lambda: cpu.tiled(*op_args)),
                     "amx": _amx_time(timer, op_args)}
        us = {name: t * 1e6 for name, t in paths.items()}
        rows.append(dict(n=n, k=k, batch=b, dense_us=dense * 1e6, **{f"{p_}_us": v for p_, v in us.items()}))
        sink(f"| {n}x{k} | {b} | {dense * 1e6:.1f} | " + " | ".join(f"{v:.1f}" for v in us.values()) + " |")
        print(f"{n:>6}x{k:<6} B={b:<4} dense {dense * 1e6:9.1f} us  "
              + "  ".join(f"{name} {v:9.1f} us" for name, v in us.items()), flush=True)
    if amx_mode == "tiles":
        cpu.set_amx("auto")
    return rows


def _amx_time(timer, op_args) -> float:
    """The AMX panel path alone at any batch (nan where the CPU has no AMX tiles); the other spMspV
    column is timed with it off, so the two compare the paths, not the dispatch."""
    if cpu.amx()[0] != "tiles":
        return float("nan")
    cpu.set_amx("on")
    cpu.set_amx_min_tokens(1)
    try:
        return timer(lambda: cpu.spmspv(*op_args))
    finally:
        cpu.set_amx("off")
        cpu.set_amx_min_tokens(None)


def run_variants(args, device, timer, sink) -> list[dict]:
    """CUDA: every decode kernel configuration the tuner chooses from, each timed on its own
    (p_w = p_x = 0.5), against cuBLAS and the GEMM path in the same run: which variant wins where."""
    if device.type != "cuda":
        raise SystemExit("--variants times the CUDA decode kernels: use --device cuda")
    rows = []
    for n, k, w, p, b, x, thr in half_sparse_points(args, device):
        dense = timer(lambda: torch.matmul(x, w.t()))
        gemm_t = timer(lambda: gpu.gemm(x, p.bitmap, p.offsets, p.values, thr, None, n))
        block_b = 1 << max(0, (b - 1).bit_length())
        for cfg in gpu._decode_configs(block_b):
            try:
                t = timer(lambda c=cfg: gpu.decode(x, p.bitmap, p.offsets, p.values, thr, None, n, cfg=c))
            except Exception as exc:  # a config that does not compile or run here
                print(f"{n}x{k} B={b} {cfg}: {type(exc).__name__}: {exc}", flush=True)
                continue
            name = " ".join(f"{key}={val}" for key, val in cfg.items())
            rows.append(dict(n=n, k=k, batch=b, cfg=name, us=t * 1e6, dense_us=dense * 1e6))
            sink(f"| {n}x{k} | {b} | {name} | {dense * 1e6:.1f} | {gemm_t * 1e6:.1f} | {t * 1e6:.1f} | "
                 f"**{dense / t:.2f}x** |")
            print(f"{n:>6}x{k:<6} B={b:<3} dense {dense * 1e6:7.1f} us  gemm {gemm_t * 1e6:7.1f} us  "
                  f"decode {t * 1e6:7.1f} us  x{dense / t:5.2f}  {name}", flush=True)
        best = min((r for r in rows if (r["n"], r["k"], r["batch"]) == (n, k, b)),
                   key=lambda r: r["us"], default=None)
        if best:
            print(f"# best {n}x{k} B={b}: {best['us']:.1f} us ({dense * 1e6 / best['us']:.2f}x): "
                  f"{best['cfg']}", flush=True)
    return rows


def markdown_header(args, device, bw, load) -> str:
    cmd = f"python -m {args.prog} " + " ".join(args.argv)
    return (f"Machine: {machine(device)}; copy bandwidth {bw / 1e9:.1f} GB/s; dtype {args.dtype}; "
            f"date {datetime.date.today()}; load average at start {load:.2f}; "
            f"{'cold: weights from DRAM (' + format(args.cold_mib, 'g') + ' MiB of copies)' if args.cold_mib else 'warm: one weight, reused'}; "
            f"{f'medians of {args.rounds} alternated rounds; ' if args.cold_mib and args.rounds > 1 else ''}"
            f"dense baseline: {args.baseline_name}.\n"
            f"Command: `{cmd}`\n")


SWEEP_HEADER = ("| N x K | p_w | p_x | batch | dense us | dual us | speedup | dense bw | dual bw |\n"
                "|---|---|---|---|---|---|---|---|---|")
CUTOVER_HEADERS = {  # run_cutover's columns per device type
    "cpu": ("| N x K | batch | dense us | spMspV us (AMX off) | tiled path us | AMX panel path us |\n"
            "|---|---|---|---|---|---|"),
    "cuda": ("| N x K | batch | cuBLAS us | decode path us | GEMM path us | tiled path us |\n"
             "|---|---|---|---|---|---|"),
}


VARIANTS_HEADER = ("| N x K | batch | decode configuration | cuBLAS us | GEMM path us | decode us | speedup |\n"
                   "|---|---|---|---|---|---|---|")


def main(argv=None, extra_baselines: dict | None = None, prog: str = "duoserve.kernels.bench") -> None:
    """The benchmark CLI. `extra_baselines` adds dense baselines ({name: (description, factory)})
    that kernels/ cannot import itself; `prog` is the module named in the reports' command line."""
    baselines = {**DENSE_BASELINES, **(extra_baselines or {})}
    import sys
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=cli_args.device, default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--shapes", type=cli_args.shape_list(SHAPES), default="smollm2,llama",
                    help="groups (smollm2, llama) or NxK (out x in), comma-separated")
    ap.add_argument("--pw", type=cli_args.fractions, default=[0.0, 0.3, 0.5, 0.7], help="weight sparsities")
    ap.add_argument("--px", type=cli_args.fractions, default=[0.0, 0.3, 0.5, 0.7],
                    help="activation sparsities (the threshold is the p_x quantile of |x|)")
    ap.add_argument("--batch", type=cli_args.positive_ints, default=[1, 2, 4, 8, 16], help="tokens per call")
    ap.add_argument("--threads", type=cli_args.positive_int, default=1, help="CPU threads (vLLM runs the model on 1)")
    ap.add_argument("--bar", action="store_true", help="only p_w = p_x = 0.5, batch 1, bar shapes")
    ap.add_argument("--cutover", action="store_true", help="compare the two paths per batch size")
    ap.add_argument("--variants", action="store_true",
                    help="CUDA: time every decode kernel configuration separately (p_w = p_x = 0.5)")
    ap.add_argument("--cold-mib", type=cli_args.non_negative_float, default=0,
                    help="CPU: time each call on the next of enough weight copies to fill this many MiB, "
                         "so weights come from DRAM as in a real model (0: one warm weight)")
    ap.add_argument("--rounds", type=cli_args.positive_int, default=1,
                    help="CPU with --cold-mib: time dense and dual-sparse in this many alternated rounds "
                         "and report medians (the speedup: the median of the per-round ratios), for "
                         "hosts whose memory timings drift; 1: best of 3 passes each, dense once per shape")
    ap.add_argument("--baseline", default="torch", choices=sorted(baselines),
                    help="dense baseline: torch.matmul; vLLM's CPU GEMM (pre-packed oneDNN) is 'vllm' "
                         "through python -m duoserve.loaders.kernel_bench")
    ap.add_argument("--int4", action="store_true",
                    help="CPU: the int4 dual-sparse op (duoserve::dual_sparse_linear_q) against torch's dense int4 "
                         "weight-only matmul and the dense baseline, in the same run (kernels/bench_quant.py)")
    ap.add_argument("--markdown", help="append the results as a markdown table to this file")
    args = ap.parse_args(argv)
    if args.rounds > 1 and not (args.cold_mib and args.device.type == "cpu"):
        ap.error("--rounds applies to CPU runs with --cold-mib (e.g. --cold-mib 512 --rounds 9); "
                 "without them each point is timed once")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.prog = prog
    args.baseline_name, args.dense = baselines[args.baseline]
    logging.basicConfig(level=logging.WARNING)
    device = args.device
    torch.set_num_threads(args.threads)
    if args.bar:
        args.shapes, args.pw, args.px, args.batch = BAR_SHAPES, [0.5], [0.5], [1]
    timer = Timer(device)
    bw = copy_bandwidth(device, timer)
    print(f"# {machine(device)}; copy bandwidth {bw / 1e9:.1f} GB/s; load average {os.getloadavg()}",
          flush=True)
    md = open(args.markdown, "a") if args.markdown else None

    def sink(line: str) -> None:  # rows land in the file as they are measured (partial runs count)
        if md:
            md.write(line + "\n")
            md.flush()

    sink(markdown_header(args, device, bw, os.getloadavg()[0]))
    if args.int4:
        from .bench_quant import HEADER, run_int4
        sink(HEADER)
        run_int4(args, device, timer, sink, make_input, args.dense, make_weight, cold_time)
    elif args.cutover:
        sink(CUTOVER_HEADERS[device.type])
        run_cutover(args, device, timer, sink)
    elif args.variants:
        sink(VARIANTS_HEADER)
        run_variants(args, device, timer, sink)
    else:
        sink(SWEEP_HEADER)
        run_sweep(args, device, timer, bw, sink)
    print(f"# load average after: {os.getloadavg()}")
    sink(f"\nLoad average at the end: {os.getloadavg()[0]:.2f}.\n")
    if md:
        md.close()

if __name__ == "__main__":
    main()
