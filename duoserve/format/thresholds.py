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


def select_thresholds(q: QuantizationConfig, p_x: float, where: str | Path = "the checkpoint") -> dict[str, float]:
    """Module name -> activation threshold at serve-time activation sparsity `p_x` (rules above)."""
    act = q.activation_sparsity
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
    i = bisect.bisect_left(grid, p_x)
    if grid[i] == p_x:
        return {name: info.act_threshold_grid[i] for name, info in q.modules.items()}
    lo, hi = grid[i - 1], grid[i]
    w = (p_x - lo) / (hi - lo)
    out = {}
    for name, info in q.modules.items():
        t_lo, t_hi = info.act_threshold_grid[i - 1], info.act_threshold_grid[i]
        # min/max keep the float32 rounding from stepping outside the neighbours (monotone in p_x).
        out[name] = min(max(to_float32(t_lo + w * (t_hi - t_lo)), t_lo), t_hi)
    return out


def describe_selection(q: QuantizationConfig, p_x: float) -> str:
    """One line for logs: which thresholds a serve-time p_x uses."""
    act = q.activation_sparsity
    if p_x == 0.0:
        how = "thresholds 0: activation sparsity off"
    elif p_x == act.target and act.rule == "threshold":
        how = "the calibrated thresholds"
    elif act.grid is not None and p_x in act.grid:
        how = "the stored grid thresholds"
    else:
        how = "interpolated between the neighbouring grid thresholds"
    return f"activation sparsity p_x={p_x:g} ({how}; pruned for {act.target:g})"
