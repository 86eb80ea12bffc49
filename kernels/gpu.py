"""CUDA backend: launches the Triton kernels (triton_kernels.py) and picks their configurations.

    linear(x [T, K], bitmap, offsets, values, threshold, bias, n, k) -> y [T, N] in x.dtype
        decode path: spMspV that skips inactive input columns (T <= DECODE_MAX_TOKENS = 8)
        GEMM path:   decompress-on-the-fly tl.dot (all columns, tensor cores), any T
        tiled path:  W^T of a bounded chunk of rows decompressed into a scratch, then cuBLAS
                     (T > 8; the weight is decompressed once per call, not per token block)

The cutover is measured, not guessed: the first call per (shape, dtype, token bucket) times the
candidate paths (decode and GEMM for T <= 8, GEMM and tiled above) and keeps the faster
(`python -m duoserve.kernels.bench --device cuda --cutover` prints them; docs/kernels.md has the
runs). Untimed, T <= 1 takes the decode path and larger T the GEMM path. Kernel configurations are tuned the same way. Timings
are CUDA-graph replays (time_call), as vLLM runs decode. Nothing is timed while a CUDA graph is
being captured (defaults are used then), so vLLM's warm-up runs do the measuring before capture.
DUOSERVE_GPU_TUNE=0 turns both off. Works on CPU tensors under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import logging
import os

import torch

from .reference import mask_activations
from .settings import env_int

log = logging.getLogger(__name__)
DECODE_MAX_TOKENS = env_int("DUOSERVE_GPU_DECODE_MAX_TOKENS", 8, minimum=0)
DEFAULT_DECODE_TOKENS = 1  # path when nothing was measured (first call inside a graph capture)
# the tiled path's scratch (W^T of a chunk of rows) holds at most this many bytes (at least one
# row block): 64 MiB is a 4096-column weight in chunks of 8192 rows
SCRATCH_BYTES = env_int("DUOSERVE_GPU_SCRATCH_MIB", 64, minimum=1) << 20
UNPACK_BK = 32  # columns per _unpack_kernel program
_TUNE = os.environ.get("DUOSERVE_GPU_TUNE", "1") == "1"
_error: str | None = None
_tk = None
_best: dict[tuple, dict] = {}
_path: dict[tuple, str] = {}


def _kernels():
    global _tk, _error
    if _tk is None and _error is None:
        try:
            from . import triton_kernels
            _tk = triton_kernels
        except Exception as exc:  # triton missing or too old
            _error = f"{type(exc).__name__}: {exc}"
    return _tk


def available() -> bool:
    return torch.cuda.is_available() and _kernels() is not None


def import_error() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    _kernels()
    return _error


def _pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode(x, bitmap, offsets, values, threshold, bias, n, cfg=None):
    """x [T, K] (T <= 8) -> y [T, N]: spMspV over the active columns, then bias + cast.

    cfg["kind"] picks the kernel (triton_kernels.py): "pipe", "loop" and "compact" run on the
    active-column lists of _compact_kernel, "fused" does everything in one launch. Without cfg the tuned (or default) configuration is used."""
    tk = _kernels()
    t_tokens, k = x.shape
    block_b = _pow2(t_tokens)
    nb = bitmap.shape[0]
    cfg = cfg or _pick("decode", (n, k, block_b, x.dtype), x.device, lambda c: decode(
        x, bitmap, offsets, values, threshold, bias, n, c), _decode_configs(block_b))
    kind, bk = cfg["kind"], cfg["BK"]
    if kind not in DECODE_KINDS:
        raise ValueError(f"unknown decode kernel kind {kind!r}; expected one of {DECODE_KINDS}")
    if kind == "fused":
        return _decode_fused(x, bitmap, offsets, values, threshold, bias, n, block_b, cfg)
    common = dict(BLOCK_B=block_b, BK=bk, CHUNK=tk.CHUNK, HW=tk.HW_POPC, num_warps=cfg["num_warps"])
    num_chunks = triton_cdiv(k, tk.CHUNK)
    idx = torch.empty(num_chunks * tk.CHUNK, dtype=torch.int32, device=x.device)  # chunk lists
    xc = torch.empty(t_tokens, k, dtype=torch.float32, device=x.device)  # [T, K] masked x
    count = torch.empty(num_chunks, dtype=torch.int32, device=x.device)
    acc = torch.empty(t_tokens, n, dtype=torch.float32, device=x.device)  # zeroed by _compact
    tk._compact_kernel[(num_chunks,)](x, threshold, idx, xc, count, acc, t_tokens, k, acc.numel(),
                                      BLOCK_B=block_b, CHUNK=tk.CHUNK, ZERO_BLOCK=256)
    if kind == "compact":
        tk._decode_kernel[(nb, num_chunks * (tk.CHUNK // bk))](
            idx, xc, count, bitmap, offsets, values, acc, t_tokens, n, k, **common)
    else:  # "loop" / "pipe": program (row block, CPS chunks)
        kernel = tk._decode_pipe_kernel if kind == "pipe" else tk._decode_loop_kernel
        kernel[(nb, triton_cdiv(num_chunks, cfg["CPS"]))](
            idx, xc, count, bitmap, offsets, values, acc, t_tokens, n, k, num_chunks,
            CPS=cfg["CPS"], **common)
    return _finalize(acc, bias, x.dtype)


DECODE_KINDS = ("pipe", "loop", "compact", "fused")


def _decode_fused(x, bitmap, offsets, values, threshold, bias, n, block_b, cfg):
    """One launch (triton_kernels._decode_fused_kernel): compaction, spMspV, reduction, bias, cast."""
    tk = _kernels()
    t_tokens, k = x.shape
    nb = bitmap.shape[0]
    chunks = triton_cdiv(k, cfg["C"])
    ws, arrived = _workspace(x.device, block_b, n, nb)
    y = torch.empty(t_tokens, n, dtype=x.dtype, device=x.device)  # [T, N], every element written
    tk._decode_fused_kernel[(nb, chunks)](
        x, threshold, bitmap, offsets, values, bias if bias is not None else y, y, ws, arrived,
        t_tokens, n, k, chunks, BLOCK_B=block_b, C=cfg["C"], BK=cfg["BK"],
        HAS_BIAS=bias is not None, HW=tk.HW_POPC, num_warps=cfg["num_warps"])
    return y


_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device, block_b: int, n: int, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused decode's fp32 partial sums [block_b * n] and per-row-block arrival counters [nb].

    Both are zero between calls (the kernel resets what it used), so one pair per (device, token
    bucket, N) serves every layer of that width, call after call, on the one stream vLLM uses.
    Allocated once, outside any CUDA graph capture (vLLM's warm-up runs come first); a first call
    inside a capture gets a fresh zeroed pair (the zero fill is then part of the graph)."""
    key = (device, block_b, n)
    pair = _workspaces.get(key)
    if pair is None:
        pair = (torch.zeros(block_b * n, dtype=torch.float32, device=device),
                torch.zeros(nb, dtype=torch.int32, device=device))
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _workspaces[key] = pair
    return pair


def gemm(x, bitmap, offsets, values, threshold, bias, n, cfg=None):
    """x [T, K] (any T) -> y [T, N] with decompressed tiles and tl.dot."""
    tk = _kernels()
    t_tokens, k = x.shape
    bt = min(128, max(16, _pow2(t_tokens)))
    nb = bitmap.shape[0]
    tblocks = triton_cdiv(t_tokens, bt)
    cfg = cfg or _pick("gemm", (n, k, bt, x.dtype), x.device, lambda c: gemm(
        x, bitmap, offsets, values, threshold, bias, n, c), _gemm_configs(tblocks * nb, k, x.device))
    splits = max(1, min(cfg["SPLIT"], triton_cdiv(k, cfg["BK"])))
    k_per_split = triton_cdiv(triton_cdiv(k, splits), cfg["BK"]) * cfg["BK"]
    splits = triton_cdiv(k, k_per_split)
    atomic = splits > 1
    y = (torch.zeros(t_tokens, n, dtype=torch.float32, device=x.device) if atomic
         else torch.empty(t_tokens, n, dtype=x.dtype, device=x.device))  # [T, N]
    tk._gemm_kernel[(tblocks, nb, splits)](
        x, threshold, bitmap, offsets, values, bias if bias is not None else y, y, t_tokens, n, k,
        k_per_split, BT=bt, BK=cfg["BK"], HAS_BIAS=bias is not None, ATOMIC=atomic,
        DOT_F32=x.dtype == torch.float32 or tk.INTERPRET, HW=tk.HW_POPC, num_warps=cfg["num_warps"])
    return _finalize(y, bias, x.dtype) if atomic else y


def _finalize(acc, bias, dtype):
    tk = _kernels()
    y = torch.empty(acc.shape, dtype=dtype, device=acc.device)  # [T, N]
    block = 1024
    tk._finalize_kernel[(triton_cdiv(acc.numel(), block),)](
        acc, bias if bias is not None else acc, y, acc.shape[1], acc.numel(),
        HAS_BIAS=bias is not None, BLOCK=block)
    return y


def tiled(x, bitmap, offsets, values, threshold, bias, n):
    """x [T, K] -> y [T, N]: per chunk of rows, W^T decompressed into a scratch of at most
    SCRATCH_BYTES (triton_kernels._unpack_kernel), then a dense matmul (cuBLAS on CUDA) of the
    masked input. The scratch is a transient of one chunk, never a dense copy of the weights."""
    tk = _kernels()
    t_tokens, k = x.shape
    nb = bitmap.shape[0]
    xm = mask_activations(x, threshold)  # in x's dtype, compared in fp32; a NaN input is dropped
    block_bytes = k * 128 * values.element_size()
    # _unpack_kernel indexes the scratch with int32: at most 2^31 - 1 elements whatever the budget
    chunk_blocks = max(1, min(SCRATCH_BYTES // block_bytes, (2**31 - 1) // (k * 128)))
    parts = []
    for rb0 in range(0, nb, chunk_blocks):
        blocks = min(chunk_blocks, nb - rb0)
        r0 = rb0 * 128
        rows = min(n, r0 + blocks * 128) - r0
        wt = torch.empty(k, rows, dtype=values.dtype, device=x.device)  # [K, rows] = W[r0:, :]^T
        tk._unpack_kernel[(blocks, triton_cdiv(k, UNPACK_BK))](
            bitmap, offsets, values, wt, rb0, k, rows, BK=UNPACK_BK, HW=tk.HW_POPC)
        parts.append(torch.matmul(xm, wt) if bias is None else torch.addmm(bias[r0:r0 + rows], xm, wt))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def linear(x, bitmap, offsets, values, threshold, bias, n, k):
    """The CUDA kernel of duoserve::dual_sparse_linear (see ops.py).

    The faster of two paths, timed once per (shape, dtype, token bucket) on first use (the
    measured cutover): decode or GEMM for T <= DECODE_MAX_TOKENS, GEMM or tiled above."""
    t_tokens = x.shape[0]
    if t_tokens == 0:
        return x.new_empty((0, n))
    args = (x, bitmap, offsets, values, threshold, bias, n)
    if t_tokens <= DECODE_MAX_TOKENS:
        candidates = {"decode": lambda: decode(*args), "gemm": lambda: gemm(*args)}
        default = "decode" if t_tokens <= DEFAULT_DECODE_TOKENS else "gemm"
    else:
        candidates = {"gemm": lambda: gemm(*args), "tiled": lambda: tiled(*args)}
        default = "gemm"
    path = _choose_path(("path", n, k, _pow2(t_tokens), x.dtype), x.device, candidates, default)
    return candidates[path]()


def _can_time(device) -> bool:
    """Whether a call here may be timed: tuning on, a CUDA device, no graph being captured."""
    return _TUNE and device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def _choose_path(key, device, candidates: dict, default: str) -> str:
    """The fastest of `candidates` (name -> call) for `key`, timed once per process; `default`
    while nothing can be timed (then nothing is remembered, so a later call still measures)."""
    path = _path.get(key)
    if path is not None:
        return path
    if not _can_time(device):
        return default
    times = {}
    for name, call in candidates.items():
        try:
            times[name] = _tune_time(call)
        except Exception as exc:  # e.g. a kernel that does not compile on this GPU
            log.warning("duoserve path %s for %s failed: %s", name, key, exc)
    if not times:
        raise RuntimeError(f"no kernel path runs for {key}")
    _path[key] = min(times, key=times.get)
    log.info("path %s: %s -> %s", key, ", ".join(f"{p} {1e6 * t:.1f} us" for p, t in times.items()),
             _path[key])
    return _path[key]


def time_call(fn, calls: int = 20, replays: int = 10) -> float:
    """Seconds per call of fn() on the current CUDA device, as CUDA-graph replays (median).

    This is how vLLM runs decode, and the only fair way to compare these kernels: launched one by
    one from Python, a Triton launch costs more CPU time than a 40 us kernel runs, so eager
    timing (triton.testing.do_bench) measured launch overhead and picked configurations 25% slower
    than the best on an H100 (docs/kernels.md). fn() runs once first (compile, allocations)."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # a warm-up call on the capture stream, as torch requires
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]


def _tune_time(fn) -> float:
    """time_call, or eager timing where a graph cannot be captured here (with a warning)."""
    try:
        return time_call(fn)
    except RuntimeError as exc:  # e.g. a caller's stream state that forbids capture
        log.warning("duoserve: CUDA-graph timing failed (%s); tuning with eager timings", exc)
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=20) / 1e3


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _decode_configs(block_b: int) -> list[dict]:
    """Candidates, best measured first: the first is what runs when nothing is timed (tuning
    off, or a shape first seen inside a graph capture).

    Measured on an H100 (docs/kernels.md, variant table: bf16, batch 1, p_w = p_x = 0.5, graph
    replays): the pipelined loop with BK 16 over 2 chunks and 2 warps was the fastest at both
    Llama-7B MLP shapes, the one-tile compact kernel with 2 warps within 3%; 4 warps cost
    15-25%, wider tiles more. The losers of that table (8 warps, fused chunks of 256/512,
    unguarded fused tiles) are no longer timed."""
    fit = lambda bk: max(4, bk // block_b)  # noqa: E731  BLOCK_B * BK * 128 products in registers
    out = [{"kind": "pipe", "BK": fit(16), "CPS": 2, "num_warps": 2},
           {"kind": "compact", "BK": fit(16), "num_warps": 2},
           {"kind": "pipe", "BK": fit(16), "CPS": 1, "num_warps": 2},
           {"kind": "pipe", "BK": fit(16), "CPS": 4, "num_warps": 2},
           {"kind": "compact", "BK": fit(32), "num_warps": 2},
           {"kind": "compact", "BK": fit(16), "num_warps": 4},
           {"kind": "loop", "BK": fit(32), "CPS": 1, "num_warps": 4},
           {"kind": "fused", "C": 128, "BK": fit(32), "num_warps": 4},
           {"kind": "fused", "C": 128, "BK": fit(32), "num_warps": 2}]
    return out


def _gemm_configs(programs: int, k: int, device) -> list[dict]:
    # split K to fill the GPU: every split is an independent load chain in flight
    fill = max(1, (2 * _num_sms(device)) // max(1, programs))
    splits = sorted({1, min(fill, max(1, k // 64)), min(4 * fill, max(1, k // 128))})
    return [{"BK": bk, "SPLIT": s, "num_warps": w} for bk in (32, 64) for s in splits for w in (4, 8)]


def _pick(kind: str, key: tuple, device, run, configs: list[dict]) -> dict:
    """Best config for `key`, timed once per process (configs that fail to compile or run are
    skipped); the first config where nothing can be timed (no CUDA, tuning off, graph capture)."""
    full_key = (kind, *key)
    if full_key in _best:
        return _best[full_key]
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if capturing:
        return configs[0]
    if not _TUNE or device.type != "cuda" or len(configs) == 1:
        return _best.setdefault(full_key, configs[0])
    timings = []
    for cfg in configs:
        try:
            timings.append((_tune_time(lambda: run(cfg)), cfg))
        except Exception as exc:  # e.g. too many registers: skip this candidate
            log.warning("duoserve %s config %s failed: %s", kind, cfg, exc)
    if not timings:
        raise RuntimeError(f"no {kind} kernel configuration runs for {key}")
    best = min(timings, key=lambda tc: tc[0])[1]
    log.info("tuned %s %s -> %s (%.1f us)", kind, key, best, 1e6 * min(t for t, _ in timings))
    _best[full_key] = best
    return best
