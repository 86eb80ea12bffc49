"""Layer-adaptive activation sparsity: TEAL's block-wise greedy allocation of p_x over the linears.

Uniform serving gives every target linear the same p_x. TEAL (Liu et al. 2024, Sec. 4.2 and its
greedyopt.py) instead lets the linears of a decoder block take different p_x at the same block
average, chosen greedily to keep the block's output close to its dense-activation output; the
DuoGPT paper names this as unexplored for dual-sparse models. Here, on the pruned model with its
own calibrated threshold grid (format 2), for every decoder block:

- inputs: the block's inputs on a few calibration windows of the pruned model run with activation
  sparsity off (TEAL's dense stream, the same for every target, so one search serves all targets);
  reference: the block's output on them at p_x 0;
- error E: the squared error of the block output against the reference over the positions from
  seqlen/4 on (TEAL measures the last quarter; the first positions hold the attention-sink
  activations, which would dominate a squared error), with each linear's input thresholded at the
  grid threshold of its current p_x (what serving does);
- start at p_x 0 everywhere and repeatedly move one linear up by one step on its grid: the one
  whose step costs least error per weight skipped, (E_after - E_now) / (K*N * delta p_x). TEAL
  moves a fixed block-average step (step sizes inversely proportional to the linear's size); with
  grid steps, dividing by the weights a step skips is the same exchange rate. Linears with at most
  half the K*N of the block's largest (q/k/v/o in Llama-style MLP-heavy blocks) step two grid
  points at a time, which about halves the number of steps (the search's cost) at little loss:
  their moves change the block mean least;
- stop once the block's K*N-weighted mean p_x reaches the largest target. The path is recorded,
  and the table for a target T is the point of the path where the mean reaches T, the last step
  taken part way (its p_x interpolated, which the grid's threshold interpolation serves), so every
  block meets T exactly, and so does the model. Tables are monotone in T by construction.

Why per block and not one model-wide greedy on the logits: a model-wide greedy re-measures every
candidate with a forward through the rest of the model (half the layers and the LM head on
average, ~20x a block forward, x 7 linears x 30 layers per step on SmolLM2), hours on a CPU; and
block-output errors of different blocks are not on one scale (the residual stream grows with
depth), so they cannot rank linears across blocks. Each block therefore keeps the target average.

The weighting is K*N (in_features x out_features): the speed model of activation sparsity is the
weight columns a kernel skips, and a skipped input channel saves that column of the linear (its
non-zeros, with weight sparsity about uniform across linears, proportional to K*N).

Search cost: lazy greedy (a candidate's stale cost is re-measured only when it is the cheapest;
exact when costs only grow as other linears get sparser, which is the usual case), about two block
forwards per step instead of seven. `lazy=False` measures every candidate at every step (TEAL).
"""
from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from duoserve.format.allocation_table import ActivationAllocation
from duoserve.prune.activation import ActivationSparsity
from duoserve.prune.architectures import decoder_layers, layer_targets
from duoserve.prune.streams import capture_layer_inputs, run_layer

log = logging.getLogger(__name__)

DEFAULT_ALLOCATION_TARGETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
DEFAULT_ALLOCATION_NSAMPLES = 4
DEFAULT_ALLOCATION_SEQLEN = 128
ALLOCATION_SEED_OFFSET = 2  # prune draws its windows with seed, thresholds with seed + 1
_EPS = 1e-9


@dataclass(frozen=True)
class Step:
    """One move of the greedy path inside a block: `name` from p_from to p_to; the block's
    K*N-weighted mean p_x went from mean_from to mean_to."""

    name: str
    p_from: float
    p_to: float
    mean_from: float
    mean_to: float


def table_at(steps: list[Step], names: list[str], target: float) -> dict[str, float]:
    """Per-linear p_x where the path's block mean reaches `target` (the last step taken part way)."""
    p = {n: 0.0 for n in names}
    for s in steps:
        if s.mean_to >= target - _EPS:
            frac = (target - s.mean_from) / (s.mean_to - s.mean_from)
            p[s.name] = s.p_from + min(max(frac, 0.0), 1.0) * (s.p_to - s.p_from)
            return p
        p[s.name] = s.p_to
    raise ValueError(f"the greedy path ends at block mean {steps[-1].mean_to if steps else 0.0}, below {target}")


def check_targets(targets, grid: tuple[float, ...]) -> tuple[float, ...]:
    from duoserve.errors import InputError

    targets = tuple(sorted({round(float(t), 6) for t in targets}))
    if not targets:
        raise InputError("--allocation-targets: give at least one average p_x, e.g. 0.3,0.5")
    bad = [t for t in targets if not 0.0 < t < 1.0]
    if bad:
        raise InputError(f"allocation target {bad[0]:g} is outside (0, 1): give average activation sparsities such "
                         "as 0.3,0.5")
    if targets[-1] > grid[-1]:
        raise InputError(f"allocation target {targets[-1]:g} is above the checkpoint's largest calibrated p_x "
                         f"{grid[-1]:g}: no linear can be sparser than its grid")
    return targets


class _BlockSearch:
    """The greedy search of one decoder block (see the module docstring)."""

    def __init__(self, layer: nn.Module, found: dict[str, nn.Linear], hidden: list[torch.Tensor], kwargs,
                 grid: tuple[float, ...], thresholds: dict[str, list[float]], start: int):
        self.layer, self.found, self.hidden, self.kwargs = layer, found, hidden, kwargs
        self.grid, self.thr, self.start = grid, thresholds, start
        self.names = list(found)
        self.size = {n: found[n].in_features * found[n].out_features for n in self.names}
        self.total = sum(self.size.values())
        self.idx = {n: 0 for n in self.names}
        biggest = max(self.size.values())
        self.jump = {n: 2 if 2 * self.size[n] <= biggest else 1 for n in self.names}
        self.last = len(grid) - 1
        self.cur = {n: 0.0 for n in self.names}  # thresholds now; the hooks read this dict
        self.evaluations = 0
        self.refs: list[torch.Tensor] = []

    def mean(self, p: dict[str, float]) -> float:
        return sum(self.size[n] * p[n] for n in self.names) / self.total

    def error(self, thresholds: dict[str, float] | None = None) -> float:
        """Squared error of the block output against the reference (positions from `start` on)."""
        saved = dict(self.cur)
        if thresholds is not None:
            self.cur.update(thresholds)
        try:
            total = 0.0
            for h, ref in zip(self.hidden, self.refs):
                out = run_layer(self.layer, h, self.kwargs)[:, self.start:].float()  # [b, T', d]
                total += float(((out - ref) ** 2).sum(dtype=torch.float64))
            self.evaluations += 1
            return total
        finally:
            self.cur.update(saved)

    def _next(self, n: str) -> int:
        return min(self.idx[n] + self.jump[n], self.last)

    def _candidate(self, n: str, e_now: float) -> tuple[float, float]:
        i, j = self.idx[n], self._next(n)
        e = self.error({n: self.thr[n][j]})
        return (e - e_now) / (self.size[n] * (self.grid[j] - self.grid[i])), e

    def run(self, max_target: float, lazy: bool = True) -> tuple[list[Step], list[torch.Tensor]]:
        """The greedy path up to block mean `max_target`, and the block's dense outputs (next inputs)."""
        steps: list[Step] = []
        last = self.last
        order = {n: k for k, n in enumerate(self.names)}
        with ActivationSparsity(self.found, "threshold", thresholds=self.cur):
            outs = [run_layer(self.layer, h, self.kwargs) for h in self.hidden]  # all thresholds 0
            self.refs = [o[:, self.start:].float() for o in outs]
            e_now, mean, version = 0.0, 0.0, 0
            heap = []  # (cost per weight, order, name, error after, version measured at)
            if lazy:
                for n in self.names:
                    r, e = self._candidate(n, e_now)
                    heap.append((r, order[n], n, e, version))
                heapq.heapify(heap)
            while mean < max_target - _EPS:
                if lazy:
                    if not heap:
                        break
                    while heap[0][4] != version:  # stale: re-measure, put back
                        _, k, n, _, _ = heapq.heappop(heap)
                        r, e = self._candidate(n, e_now)
                        heapq.heappush(heap, (r, k, n, e, version))
                    _, _, best, e_best, _ = heapq.heappop(heap)
                else:
                    movable = [n for n in self.names if self.idx[n] < last]
                    if not movable:
                        break
                    scored = [(*self._candidate(n, e_now), order[n], n) for n in movable]
                    _, e_best, _, best = min(scored)
                p_from = self.grid[self.idx[best]]
                self.idx[best] = self._next(best)
                self.cur[best] = self.thr[best][self.idx[best]]
                e_now, version = e_best, version + 1
                new_mean = self.mean({n: self.grid[self.idx[n]] for n in self.names})
                steps.append(Step(best, p_from, self.grid[self.idx[best]], mean, new_mean))
                mean = new_mean
                if lazy and self.idx[best] < last:
                    r, e = self._candidate(best, e_now)
                    heapq.heappush(heap, (r, order[best], best, e, version))
        return steps, outs

    def threshold_at(self, n: str, p: float) -> float:
        from duoserve.format.thresholds import grid_threshold

        return grid_threshold(self.grid, tuple(self.thr[n]), p)


@torch.no_grad()
def greedy_allocation(model: nn.Module, windows: torch.Tensor, grid: tuple[float, ...],
                      grid_thresholds: dict[str, list[float]], targets: tuple[float, ...],
                      target_names: tuple[str, ...], *, batch_size: int = 4, device="cpu",
                      dtype=torch.float32, lazy: bool = True, calibration: dict | None = None,
                      compare_uniform: bool = True) -> ActivationAllocation:
    """The greedy allocation table for `targets` (average p_x), from the model's threshold grid.

    grid_thresholds: full module name -> thresholds at `grid` (the checkpoint's act_threshold_grid).
    windows: calibration token windows [S, T] (never evaluation text). With compare_uniform, each
    block's output error at every target is also measured for the uniform rule (one extra block
    forward per target and rule) and kept in `info`, so the log shows what the greedy bought.
    """
    targets = check_targets(targets, grid)
    grid = tuple(grid)
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    storage = {i: next(layer.parameters()).dtype for i, layer in enumerate(layers)}
    streams = capture_layer_inputs(model, windows, batch_size, device, dtype)
    hidden = streams.batches
    start = windows.shape[1] // 4
    table: dict[str, list[float]] = {}
    block_errors = []
    t0, evaluations = time.time(), 0
    for i in tqdm(range(len(layers)), desc="greedy allocation", unit="layer"):
        layer = layers[i].to(device=device, dtype=dtype)
        found = layer_targets(layer, target_names)
        thr = {n: list(grid_thresholds[f"{prefix}.{i}.{n}"]) for n in found}
        search = _BlockSearch(layer, found, hidden, streams.layer_kwargs[i], grid, thr, start)
        steps, outs = search.run(targets[-1], lazy=lazy)
        per_target = [table_at(steps, search.names, t) for t in targets]
        for n in search.names:
            table[f"{prefix}.{i}.{n}"] = [round(p[n], 6) for p in per_target]
        if compare_uniform:
            with ActivationSparsity(found, "threshold", thresholds=search.cur):
                row = {}
                for t, p in zip(targets, per_target):
                    greedy = search.error({n: search.threshold_at(n, p[n]) for n in search.names})
                    uniform = search.error({n: search.threshold_at(n, t) for n in search.names})
                    row[f"{t:g}"] = [greedy, uniform]
            block_errors.append(row)
            log.debug("layer %d block output error greedy/uniform: %s", i,
                      {t: round(g / u, 3) if u else None for t, (g, u) in row.items()})
        evaluations += search.evaluations
        hidden = outs
        layers[i].to(device="cpu", dtype=storage[i])
    seconds = time.time() - t0
    log.info("greedy allocation: %d layers, %d block forwards, %.0f s", len(layers), evaluations, seconds)
    info = {"search": "TEAL block-wise greedy (lazy)" if lazy else "TEAL block-wise greedy",
            "objective": "squared error of each decoder block's output vs p_x 0, positions from seqlen/4 on, "
                         "block inputs from the pruned model with activation sparsity off",
            "weighting": "K*N (in x out features of each linear)",
            "calibration": dict(calibration or {}), "block_forwards": evaluations, "seconds": round(seconds, 1)}
    if block_errors:
        # Sum over blocks of the block output errors, greedy and uniform, per target: the objective.
        info["block_error_greedy_vs_uniform"] = {
            t: [sum(r[t][0] for r in block_errors), sum(r[t][1] for r in block_errors)] for t in block_errors[0]}
    return ActivationAllocation(method="greedy", targets=targets,
                                modules={n: tuple(ps) for n, ps in table.items()}, info=info)


def with_greedy_allocation(model: nn.Module, tokenizer, q, *, calib_data: str, seed: int,
                           targets=DEFAULT_ALLOCATION_TARGETS, nsamples: int = DEFAULT_ALLOCATION_NSAMPLES,
                           seqlen: int = DEFAULT_ALLOCATION_SEQLEN, batch_size: int = 4, device="cpu",
                           lazy: bool = True):
    """`q` (a QuantizationConfig with a threshold grid, of `model`'s pruned weights) with the greedy
    table added, measured on `nsamples` windows of the calibration source (its fit split for a
    named source; never evaluation text). Used by `duoserve allocate` and `duoserve prune
    --allocation greedy`."""
    from dataclasses import replace

    from duoserve.errors import InputError
    from duoserve.prune.architectures import bos_for
    from duoserve.prune.data import calibration_windows

    act = q.activation_sparsity
    if act.grid is None:
        raise InputError(f"format v{q.format_version} without a threshold grid: nothing to allocate from")
    targets = check_targets(targets, act.grid)
    if nsamples <= 0 or seqlen < 8:
        raise InputError("--allocation-nsamples must be positive and --allocation-seqlen at least 8")
    windows, desc = calibration_windows(calib_data, tokenizer, nsamples, seqlen, seed, bos_for(model, tokenizer))
    log.info("greedy allocation on %s", desc)
    grid_thresholds = {n: list(m.act_threshold_grid) for n, m in q.modules.items()}
    alloc = greedy_allocation(model, windows, act.grid, grid_thresholds, targets, q.targets, batch_size=batch_size,
                              device=device, lazy=lazy,
                              calibration={"data": calib_data, "description": desc, "nsamples": nsamples,
                                           "seqlen": seqlen, "seed": seed})
    return replace(q, activation_sparsity=replace(act, allocation=alloc))
