"""CPU backend: the native extension (kernels/csrc: dual_sparse_cpu.cpp and its parts, built by `pip install`).

Loading it registers the CPU kernel of `duoserve::dual_sparse_linear` in C++ (TORCH_LIBRARY_IMPL; the
schema is defined once, in ops.py, before the extension loads), so a
CPU call goes from the dispatcher straight to C++ (a few microseconds; a Python-side custom op
costs ~20 us a call, more than the whole 576x576 product). Behind that kernel:
  T <= sparse_max_tokens (bf16/fp32): the spMspV walk (AVX-512; bf16 with AVX2 on CPUs without
    AVX-512; a scalar loop otherwise): per row block, only the columns active for some token are
    read, with a software prefetch (AVX-512: of the column 48 active columns ahead, as the
    scattered spans defeat the hardware prefetchers; AVX2: of every line of the row block 4 KiB
    ahead, one sequential stream, as skipped spans cost nearly as much as read ones on the Zen 3
    host; `set_prefetch`, DUOSERVE_CPU_PREFETCH), except where walking every column is
    faster: a weight with long spans and not too many columns inactive (`set_walk_all`). How long is long
    depends on the memory system (skipping a random half of bf16 p_w 0.5 spans is level with
    walking them all on a Zen 5 host, 1.3x slower on a Zen 4 host), so it is measured once per
    process (`walk_all_calibration`; docs/kernels.md).
  bf16 on CPUs with AVX512-BF16, 4 or 5 (measured) to 256 tokens (`set_bf16_dot_tokens`): the panel walk (every
    word decoded once into an L1 panel, multiplied like a dense GEMM).
  bf16 on CPUs with AMX-BF16 tiles (self-checked once), from 2-4 tokens (measured) with no upper bound
    (`set_amx`, DUOSERVE_CPU_AMX): the AMX panel path (the panel decoded once per K-chunk of 512
    active columns, multiplied by tile instructions).
  larger T, or fp16: row-block chunks are decompressed into a bounded W^T scratch [K, rows] and
    multiplied with torch.matmul (never a dense copy of the whole weight).
The cutover is measured with `python -m duoserve.kernels.bench --cutover`.

The walk has two AVX-512 decoders with bit-identical results: "expand" (vpexpandw / vexpandps,
AVX-512 VBMI2) and "permute" (prefix popcounts + vpermw / vpermd, AVX-512 VPOPCNTDQ). Which is
faster depends on the microarchitecture, so the first call times both on a small in-cache problem
and keeps the faster one per dtype; `DUOSERVE_CPU_DECODER` or `set_decoder` forces one. The
permute decoder also needs AVX-512 BITALG (vpopcntw: one popcount per 32-row bf16 word). With the
permute decoder and bf16, 4-6 tokens share one pass over the weights (`set_slices_max_tokens`), and
on CPUs with AVX512-BF16 batches of 4 or 5 (measured per machine) to 256 tokens take the panel walk (`set_bf16_dot_tokens`), which
also moves the tiled cutover for bf16 to 256 tokens.
"""
from __future__ import annotations

import os

import torch

from .settings import env_int, kernel_choice

DTYPES = (torch.bfloat16, torch.float32)

_ext = None
_error: str | None = None


DEFAULT_PREFETCH = (48, 3, -1)  # (ahead, lines, stream): see set_prefetch
AMX_MODES = ("auto", "off", "on")  # DUOSERVE_CPU_AMX; set_amx also takes "emulate" (tests)


def parse_prefetch(text: str) -> tuple[int, int, int]:
    """DUOSERVE_CPU_PREFETCH: "AHEAD,LINES", the column prefetch in every walk (distance in active
    columns, 64-byte lines per column, 0 lines: exactly the column's lines; "0,0" turns software
    prefetch off), or "stream,BYTES", the stream prefetch in every 1-3 token walk -> set_prefetch's
    arguments."""
    try:
        first, second = text.split(",")
        if first.strip() == "stream":
            stream = int(second)
            if stream <= 0:
                raise ValueError
            return DEFAULT_PREFETCH[0], DEFAULT_PREFETCH[1], stream
        ahead, lines = int(first), int(second)
        if ahead < 0 or lines < 0:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"DUOSERVE_CPU_PREFETCH must be AHEAD,LINES with two integers >= 0 (e.g. 48,3; 0,0 turns "
            f"software prefetch off) or stream,BYTES with BYTES > 0 (e.g. stream,4096), got {text!r}"
        ) from None
    return ahead, lines, 0


def _parse_walk_all() -> list[float | None]:
    """DUOSERVE_CPU_WALK_ALL_MAX_INACTIVE (a fraction) and DUOSERVE_CPU_WALK_ALL_MIN_SPAN (bytes):
    each one set replaces that half of the measured walk-all policy (see `set_walk_all`); None: unset."""
    values: list[float | None] = []
    for name in ("DUOSERVE_CPU_WALK_ALL_MAX_INACTIVE", "DUOSERVE_CPU_WALK_ALL_MIN_SPAN"):
        text = os.environ.get(name)
        try:
            value = None if text is None else float(text)
            if value is not None and not value >= 0:  # also refuses nan
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{name} must be a number >= 0 (the walk-all policy: see docs/kernels.md, 'When to "
                f"skip inactive columns'), got {text!r}"
            ) from None
        values.append(value)
    return values


def _int_settings() -> dict[str, int]:
    """The integer settings given in the environment, by variable; bad text raises, naming the
    variable (the extension's setters then check the ranges)."""
    names = ("DUOSERVE_CPU_SPARSE_MAX_TOKENS", "DUOSERVE_CPU_SLICES_MAX_TOKENS",
             "DUOSERVE_CPU_BF16_DOT_MIN_TOKENS", "DUOSERVE_CPU_BF16_DOT_MAX_TOKENS",
             "DUOSERVE_CPU_AMX_MIN_TOKENS")
    return {name: env_int(name) for name in names if name in os.environ}


def _apply_int_settings(ext, settings: dict[str, int]) -> None:
    if "DUOSERVE_CPU_SPARSE_MAX_TOKENS" in settings:
        ext.set_sparse_max_tokens(settings["DUOSERVE_CPU_SPARSE_MAX_TOKENS"])
    if "DUOSERVE_CPU_SLICES_MAX_TOKENS" in settings:
        ext.set_slices_max_tokens(settings["DUOSERVE_CPU_SLICES_MAX_TOKENS"])
    if "DUOSERVE_CPU_BF16_DOT_MIN_TOKENS" in settings or "DUOSERVE_CPU_BF16_DOT_MAX_TOKENS" in settings:
        # the unset half keeps its default (the minimum: -1, measured on first use)
        ext.set_bf16_dot_tokens(settings.get("DUOSERVE_CPU_BF16_DOT_MIN_TOKENS", -1),
                                settings.get("DUOSERVE_CPU_BF16_DOT_MAX_TOKENS", ext.get_bf16_dot_max_tokens()))
    if "DUOSERVE_CPU_AMX_MIN_TOKENS" in settings:
        ext.set_amx_min_tokens(settings["DUOSERVE_CPU_AMX_MIN_TOKENS"])


def _load():
    global _ext, _error
    if _ext is None and _error is None:
        if kernel_choice() == "reference":
            _error = "not loaded: DUOSERVE_KERNEL=reference"
            return None
        if os.environ.get("_DUOSERVE_TEST_NO_CPU_EXTENSION") == "1":  # test hook: a machine without the build
            _error = "ImportError: hidden by _DUOSERVE_TEST_NO_CPU_EXTENSION=1"
            return None
        prefetch = os.environ.get("DUOSERVE_CPU_PREFETCH")
        prefetch = parse_prefetch(prefetch) if prefetch else None  # bad text raises, on every call
        walk_all = _parse_walk_all()
        int_settings = _int_settings()
        try:
            from . import _cpu_kernels as ext  # built by setup.py from kernels/csrc
        except ImportError as exc:  # not built (DUOSERVE_SKIP_CPU_KERNEL=1, no compiler)
            _error = f"{type(exc).__name__}: {exc}"
            return None
        # Published only once every setting is applied: a setter that refuses its value (a range,
        # a decoder this CPU lacks) raises here, and raises again on the next call.
        _apply_int_settings(ext, int_settings)
        if walk_all != [None, None]:  # an unset half keeps the measured value (measured only then)
            measured = ext.get_walk_all() if None in walk_all else walk_all
            ext.set_walk_all(*(v if v is not None else m for v, m in zip(walk_all, measured)))
        if prefetch is not None:
            ext.set_prefetch(*prefetch)
        amx = os.environ.get("DUOSERVE_CPU_AMX")
        if amx and amx not in AMX_MODES:
            raise ValueError(f"DUOSERVE_CPU_AMX must be one of {', '.join(AMX_MODES)}, got {amx!r}")
        if amx:
            ext.set_amx(amx)  # "on" where AMX is unavailable raises, with the reason
        if os.environ.get("DUOSERVE_CPU_DECODER"):
            ext.set_decoder(os.environ["DUOSERVE_CPU_DECODER"])  # a bad name raises, naming the choices
        _ext = ext
    return _ext


def available() -> bool:
    return _load() is not None


def import_error() -> str | None:
    _load()
    return _error


def isa() -> str:
    """The instruction set the native spMspV kernel uses here ('avx512', 'avx2' or 'scalar')."""
    return _load().isa() if available() else "none"


def spmspv(x, bitmap, offsets, values, threshold, bias, n: int, force_scalar: bool = False):
    """The sparse walk alone (any T), bf16/fp32: x [T, K] -> y [T, N]. For tests and benchmarks."""
    return _load().spmspv(x, bitmap, offsets, values, threshold, bias, n, int(force_scalar))


def tiled(x, bitmap, offsets, values, threshold, bias, n: int):
    """The decompress-tiles + matmul path alone (any T, any dtype). For tests and benchmarks."""
    return _load().tiled_linear(x, bitmap, offsets, values, threshold, bias, n)


def set_sparse_max_tokens(t: int | None) -> None:
    """Calls of up to `t` tokens take the spMspV walk, larger ones the tiled path (bf16 batches in
    the panel walk's range excepted); None: back to the default, 12 with the AVX-512 decoders and 3
    with the AVX2 decoder or the scalar loop."""
    _load().set_sparse_max_tokens(-1 if t is None else int(t))


def sparse_max_tokens(dtype: torch.dtype = torch.bfloat16) -> int:
    """The walk/tiled cutover in use for `dtype` (it follows that dtype's decoder unless set)."""
    if dtype not in DTYPES:
        raise ValueError(f"the spMspV walk runs bf16 and fp32, not {dtype}")
    return _load().get_sparse_max_tokens("bf16" if dtype == torch.bfloat16 else "fp32")


def set_walk_all(max_inactive: float | None, min_span_bytes: float | None = None) -> None:
    """Walk every column (masked inputs as zeros) instead of skipping the inactive ones when fewer
    than `max_inactive` (a fraction) of them are inactive and the weight's values per row block and
    column average more than `min_span_bytes`. (0, any): always skip; (2, 0): always walk all;
    None: back to the measured policy (`walk_all_calibration`)."""
    if max_inactive is None:
        _load().reset_walk_all()
        return
    if min_span_bytes is None:
        raise ValueError("set_walk_all needs both max_inactive and min_span_bytes (or None alone)")
    _load().set_walk_all(float(max_inactive), float(min_span_bytes))


def walk_all() -> tuple[float, float]:
    """(max_inactive, min_span_bytes) of the walk-all policy in use (measured on first use unless set).
    A call whose walk streams its row blocks (`prefetch_mode`) skips every inactive column under the
    measured policy (it reads their lines anyway); a set one applies to every call."""
    max_inactive, min_span = _load().get_walk_all()
    return max_inactive, min_span


def walk_all_requested() -> bool:
    """Whether the walk-all policy was set (`set_walk_all`, DUOSERVE_CPU_WALK_ALL_*) rather than measured."""
    return bool(_load().get_walk_all_requested())


def walk_all_policies() -> dict[str, tuple[float, float]]:
    """The two (max_inactive, min_span_bytes) policies the measurement chooses between:
    "skip_short_spans" where skipping 128-byte spans pays or is level (the Zen 5 host), and
    "walk_short_spans" where it does not (the Zen 4 host: bf16 at p_w 0.5 walks every column)."""
    skip, walk = _load().get_walk_all_policies()
    return {"skip_short_spans": tuple(skip), "walk_short_spans": tuple(walk)}


def walk_all_calibration() -> dict | None:
    """The one-time measurement behind the walk-all policy (run on first use, ~0.2 s): the
    one-token bf16 walk over a synthetic p_w 0.5 weight of 4x the L3 (64-512 MiB), skipping a
    random half of the columns against walking them all; best of 5 each. If skipping takes over
    1.1x the walk, the policy is walk_short_spans, else skip_short_spans (`walk_all_policies`). None
    where nothing is measured (the scalar decoder, bound by decoding, keeps skip_short_spans)."""
    skip_s, walk_s, probe_bytes, max_inactive, min_span = _load().get_walk_all_calibration()
    if skip_s == 0.0:
        return None
    return {"skip_ms": skip_s * 1e3, "walk_all_ms": walk_s * 1e3, "skip_over_walk_all": skip_s / walk_s,
            "probe_mib": probe_bytes / 2**20, "policy": (max_inactive, min_span)}


def walks_all_columns(inactive: int, k: int, mean_span_bytes: float) -> bool:
    """The policy's decision for a call with `inactive` of `k` columns inactive for every token."""
    return _load().walk_all_columns(int(inactive), int(k), float(mean_span_bytes))


def set_prefetch(ahead: int, lines: int, stream: int = 0) -> None:
    """The walks' software prefetch of the values. The column prefetch: the values of the column
    `ahead` active columns ahead, `lines` 64-byte lines per 16-bit value width (0: exactly the
    column's lines). The stream (`stream` > 0, in the walks of 1-3 tokens): every line of the row
    block's values, inactive columns' too, `stream` bytes ahead of the current column. stream = -1:
    each walk's default (the AVX2 walk: the stream, 4096 bytes, when at least 15% of the columns
    are active, else columns; the AVX-512 walks: columns; docs/kernels.md). ahead = 0 turns both
    off. `DEFAULT_PREFETCH` restores the defaults."""
    _load().set_prefetch(int(ahead), int(lines), int(stream))


def prefetch() -> tuple[int, int, int]:
    """(ahead, lines, stream) of the software prefetch settings (see set_prefetch)."""
    ahead, lines, stream = _load().get_prefetch()
    return ahead, lines, stream


def prefetch_mode(dtype: torch.dtype = torch.bfloat16) -> str:
    """What the 1-3 token walk of `dtype` prefetches with the settings in use: 'stream 4096 B'
    (the AVX2 default adds '(columns below 25% active)': calls with fewer active columns prefetch
    columns), 'columns 48/3' (distance/lines) or 'off'."""
    if dtype not in DTYPES:
        raise ValueError(f"the spMspV walk runs bf16 and fp32, not {dtype}")
    return _load().prefetch_mode("bf16" if dtype == torch.bfloat16 else "fp32")


def available_decoders() -> list[str]:
    """The spMspV decoders this CPU can run: 'scalar', 'expand' / 'permute' with AVX-512, 'avx2'
    with AVX2 + FMA (measured choices: expand or permute where AVX-512 is there, else avx2)."""
    return list(_load().available_decoders())


def decoder(dtype: torch.dtype = torch.bfloat16) -> str:
    """The decoder the spMspV walk uses for `dtype` (bf16 or fp32); measured on first use."""
    if dtype not in DTYPES:
        raise ValueError(f"the spMspV walk runs bf16 and fp32, not {dtype}")
    return _load().decoder("bf16" if dtype == torch.bfloat16 else "fp32")


def set_decoder(name: str | None) -> None:
    """Force 'scalar', 'expand', 'permute' or 'avx2' (a CPU without its instructions is refused), or
    None to go back to the measured choice."""
    _load().set_decoder(name or "")


def set_slices_max_tokens(tokens: int) -> None:
    """bf16 with the permute decoder: batches of 4..`tokens` (at most 12; default 12) go through the
    weights in one pass, walking each chunk of columns once per slice of rows (64-row halves for 4-6
    tokens, 32-row quarters for 7-12) instead of in passes of 3 tokens (same results); 0 turns that
    off."""
    _load().set_slices_max_tokens(int(tokens))


def slices_max_tokens() -> int:
    return _load().get_slices_max_tokens()


def set_bf16_dot_tokens(min_tokens: int, max_tokens: int | None = None) -> None:
    """bf16 on CPUs with AVX512-BF16 (any SIMD decoder): batches of `min_tokens`..`max_tokens` take the
    panel walk (each chunk of columns decoded once into an L1 panel, then multiplied with vdpbf16ps
    like a dense GEMM micro-kernel; rounding differs slightly from the FMA walks: two products per
    add, denormals flushed); larger batches take the tiled path. min 0 turns it off (the FMA walks
    up to `sparse_max_tokens`); min -1 (the default) is 4 or 5, whichever this machine measured
    faster at 4 tokens on first use (`bf16_dot_min_measured`). Max 256 by default; None keeps the
    current one."""
    if max_tokens is None:
        max_tokens = _load().get_bf16_dot_max_tokens()
    _load().set_bf16_dot_tokens(int(min_tokens), int(max_tokens))


def bf16_dot_tokens() -> tuple[int, int]:
    """(min_tokens, max_tokens) of the vdpbf16ps panel walk (min 0: off); it runs only where
    `has_bf16_dot()`."""
    lo, hi = _load().get_bf16_dot_tokens()
    return lo, hi


def bf16_dot_request() -> tuple[int, int]:
    """(min_tokens, max_tokens) as requested, min -1 where it is measured: what
    `set_bf16_dot_tokens(*...)` takes to restore the current setting."""
    ext = _load()
    return (-1 if ext.get_bf16_dot_min_measured() else ext.get_bf16_dot_tokens()[0]), ext.get_bf16_dot_max_tokens()


def bf16_dot_min_measured() -> bool:
    """Whether the panel walk's minimum token count was measured on this machine (4 when the panel
    walk beat the decoder's own 4-token walk, else 5) rather than set."""
    return _load().get_bf16_dot_min_measured()


def panel_walk_tokens() -> tuple[int, int] | None:
    """(min, max) tokens of the bf16 calls that take the panel walk here, or None where it does not
    run (no AVX512-BF16, the scalar decoder forced, or turned off)."""
    lo, hi = bf16_dot_tokens()
    return (lo, hi) if lo and has_bf16_dot() and decoder(torch.bfloat16) != "scalar" else None


def has_bf16_dot() -> bool:
    return _load().has_bf16_dot()


def tiled_bf16_in_fp32() -> bool:
    """Whether the tiled (prefill) path multiplies bf16 in fp32: on CPUs without AVX512-BF16, where
    torch's bf16 matmul is no real GEMM (about 9-10 GFLOP/s at any batch on a Zen 3 host)."""
    return not _load().has_fast_bf16_gemm()


def set_amx(mode: str) -> None:
    """bf16 batches on the CPU's matrix engine (AMX-BF16 tiles): 'auto' (the default: where the CPU,
    the OS and a one-time self-check in a child process allow), 'off', 'on' (refused, with the
    reason, where unavailable) or 'emulate' (the same path with the tile operations in scalar C++,
    on any CPU with AVX512-BF16: for tests, slow)."""
    _load().set_amx(mode)


def amx() -> tuple[str, str]:
    """(what bf16 batches run on: 'tiles', 'emulated' or 'off', why)."""
    what, why = _load().amx_info()
    return what, why


def set_amx_min_tokens(tokens: int | None) -> None:
    """bf16 calls of at least `tokens` tokens take the AMX path where it runs; None: measured on first
    use (the first of 2 and 3 tokens where it beats the walk, else 4; 1 when emulated)."""
    _load().set_amx_min_tokens(-1 if tokens is None else int(tokens))


def amx_min_tokens() -> int:
    return _load().get_amx_min_tokens()


def amx_probe(mode: str = "tiles") -> float:
    """The AMX path ('tiles', or 'emulate') on a fixed irregular problem (2 row blocks, one partial;
    601 columns with some inactive; 19 tokens): the largest difference from an fp32 reference
    relative to the largest output. The self-check behind 'auto' requires <= `amx_probe_tolerance()`."""
    return _load().amx_probe(mode)


def amx_probe_tolerance() -> float:
    return _load().amx_probe_tolerance()
