"""Serve-time activation sparsity: the per-module thresholds for a p_x the user asks for.

A format-2 checkpoint stores, per target linear, the calibrated thresholds for a grid of p_x
(`activation_sparsity.grid`, `modules[*].act_threshold_grid`; docs/checkpoint-format.md). This
module turns a requested p_x into one threshold per module, the same way for every reader
(`duoserve serve` in each vLLM process, `duoserve eval` in-process), so that they agree bit for bit:
- p_x = 0: every threshold 0 (activation sparsity off: every non-zero input is used);
- p_x = the calibrated target: the calibrated thresholds themselves (the `act_threshold` values);
- p_x on the grid: the stored grid thresholds;
- p_x between two grid points: linear interpolation of the two neighbouring grid thresholds (in
  float64, then rounded to float32, the dtype the kernels compare in);
- anything else (outside [0, 1), above the grid, or any other p_x on a checkpoint without a grid)
  is an InputError that says what the checkpoint offers.
Allocation (`--allocation`): "uniform" (the rules above: every linear at p_x) or "greedy" (the
checkpoint's `activation_sparsity.allocation` table, docs/pruning.md "Layer-adaptive activation
sparsity"): p_x is then the K*N-weighted average; each module gets its own p_x, linearly
interpolated between the table's neighbouring targets (and p_x 0 = all off below the first), and
its threshold at that p_x by the grid rules above. Interpolating per module keeps the weighted
average exactly p_x. A p_x above the table's last target, or a checkpoint without a table, is an
InputError.
No torch here: the launcher validates a request before vLLM starts.
"""
from __future__ import annotations

import bisect
import math
import struct
from pathlib import Path

from duoserve.errors import InputError
from duoserve.format.schema import QuantizationConfig

# How `duoserve serve --activation-sparsity P` reaches every vLLM process (API server, engine core,
# workers): they inherit the environment, and each builds its own quantization config from it.
SERVE_ACTIVATION_SPARSITY_ENV = "DUOSERVE_ACTIVATION_SPARSITY"
SERVE_ALLOCATION_ENV = "DUOSERVE_ACTIVATION_ALLOCATION"  # likewise for --allocation
ALLOCATIONS = ("uniform", "greedy")


def to_float32(value: float) -> float:
    """The float32 nearest to `value`, as a Python float (what a float32 tensor would hold)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def parse_activation_sparsity(text: str, source: str) -> float:
    """A p_x given as text (an environment variable); InputError if it is not a number."""
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{source}={text!r} is not a number; give the activation sparsity p_x in [0, 1)") from None


def offered(q: QuantizationConfig) -> str:
    """What a checkpoint can be served at, for error messages and logs."""
    act = q.activation_sparsity
    if act.grid is not None:
        return (f"any p_x in [0, {act.grid[-1]:g}] (calibrated grid of {len(act.grid)} points, "
                f"interpolated between them; pruned for {act.target:g})")
    if act.rule == "threshold":
        return f"p_x {act.target:g} (its calibrated thresholds) or 0 (off)"
    return "p_x 0 only (it was pruned without activation sparsity)"


def check_allocation(allocation: str, source: str = "--allocation") -> str:
    if allocation not in ALLOCATIONS:
        raise InputError(f"{source} {allocation!r} is not one of {', '.join(ALLOCATIONS)}")
    return allocation


def allocated_px(q: QuantizationConfig, p_x: float, where: str | Path = "the checkpoint") -> dict[str, float]:
    """Module name -> p_x under the checkpoint's greedy allocation at average `p_x` (rules above)."""
    alloc = q.activation_sparsity.allocation
    if not (isinstance(p_x, (int, float)) and math.isfinite(p_x) and 0.0 <= p_x < 1.0):
        raise InputError(f"--activation-sparsity {p_x} is outside [0, 1): give the average fraction of the "
                         "linears' inputs to skip, e.g. 0.5")
    if alloc is None:
        raise InputError(f"--allocation greedy: {where} has no allocation table (activation_sparsity.allocation); "
                         f"compute one with `duoserve allocate {where}` (or prune with --allocation greedy), "
                         "or serve with --allocation uniform")
    targets = alloc.targets
    if p_x > targets[-1]:
        raise InputError(f"--allocation greedy --activation-sparsity {p_x:g}: {where}'s allocation table covers "
                         f"average p_x up to {targets[-1]:g} (targets {', '.join(f'{t:g}' for t in targets)}; "
                         "interpolated between them); recompute it with `duoserve allocate --targets ...`")
    if p_x == 0.0:
        return {name: 0.0 for name in q.modules}
    i = bisect.bisect_left(targets, p_x)
    if targets[i] == p_x:
        return {name: alloc.modules[name][i] for name in q.modules}
    lo = targets[i - 1] if i > 0 else 0.0
    w = (p_x - lo) / (targets[i] - lo)
    out = {}
    for name in q.modules:
        ps = alloc.modules[name]
        p_lo = ps[i - 1] if i > 0 else 0.0
        out[name] = min(max(p_lo + w * (ps[i] - p_lo), p_lo), ps[i])
    return out


def grid_threshold(grid: tuple[float, ...], thresholds: tuple[float, ...], p: float) -> float:
    """One module's threshold at p_x p in [0, grid[-1]] from its grid (exact on a grid point)."""
    if p <= 0.0:
        return 0.0
    p = min(p, grid[-1])  # a stored allocation may sit a rounding error above the last point
    i = bisect.bisect_left(grid, p)
    if grid[i] == p:
        return thresholds[i]
    w = (p - grid[i - 1]) / (grid[i] - grid[i - 1])
    t_lo, t_hi = thresholds[i - 1], thresholds[i]
    # min/max keep the float32 rounding from stepping outside the neighbours (monotone in p_x).
    return min(max(to_float32(t_lo + w * (t_hi - t_lo)), t_lo), t_hi)


def select_thresholds(q: QuantizationConfig, p_x: float, where: str | Path = "the checkpoint",
                      allocation: str = "uniform") -> dict[str, float]:
    """Module name -> activation threshold at serve-time activation sparsity `p_x` (rules above)."""
    act = q.activation_sparsity
    if check_allocation(allocation) == "greedy":
        px = allocated_px(q, p_x, where)  # a table needs a grid (schema), so every p here is on it
        return {name: grid_threshold(act.grid, info.act_threshold_grid, px[name]) for name, info in q.modules.items()}
    if not (isinstance(p_x, (int, float)) and math.isfinite(p_x) and 0.0 <= p_x < 1.0):
        raise InputError(f"--activation-sparsity {p_x} is outside [0, 1): give the fraction of each linear's "
                         f"inputs to skip, e.g. 0.5; {where} offers {offered(q)}")
    if p_x == 0.0:
        return {name: 0.0 for name in q.modules}
    if p_x == act.target and act.rule == "threshold":
        return {name: info.act_threshold for name, info in q.modules.items()}
    grid = act.grid
    if grid is None:
        raise InputError(f"--activation-sparsity {p_x:g}: {where} (format v{q.format_version}) has no threshold "
                         f"grid, so it can be served at {offered(q)}. Re-prune it with this duoserve "
                         f"(`duoserve prune ...` stores thresholds for p_x 0-0.9) to choose p_x at serve time")
    if p_x > grid[-1]:
        raise InputError(f"--activation-sparsity {p_x:g} is above the largest calibrated p_x {grid[-1]:g} of "
                         f"{where}, which offers {offered(q)}; for more, re-prune with --activation-sparsity {p_x:g}")
    return {name: grid_threshold(grid, info.act_threshold_grid, p_x) for name, info in q.modules.items()}


def describe_selection(q: QuantizationConfig, p_x: float, allocation: str = "uniform") -> str:
    """One line for logs: which thresholds a serve-time p_x uses."""
    act = q.activation_sparsity
    if allocation == "greedy" and p_x > 0.0:
        px = allocated_px(q, p_x).values()
        return (f"activation sparsity p_x={p_x:g} on average (greedy allocation: per-linear p_x {min(px):.2f}-"
                f"{max(px):.2f}, thresholds from the grid; pruned for {act.target:g})")
    if p_x == 0.0:
        how = "thresholds 0: activation sparsity off"
    elif p_x == act.target and act.rule == "threshold":
        how = "the calibrated thresholds"
    elif act.grid is not None and p_x in act.grid:
        how = "the stored grid thresholds"
    else:
        how = "interpolated between the neighbouring grid thresholds"
    return f"activation sparsity p_x={p_x:g} ({how}; pruned for {act.target:g})"
