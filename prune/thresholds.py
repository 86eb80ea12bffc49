"""TEAL-style activation thresholds, calibrated on the pruned model's own activations.

For every target linear, t is the p_x quantile of |x| over calibration tokens and channels
(P(|x| <= t) = p_x), so that keeping |x| > t zeros about p_x of its inputs. Calibration runs
layer by layer and group by group in true-sequential order with the thresholds already chosen
applied, so each linear's threshold is measured on the activations it sees at inference in
threshold mode (the serving kernels' rule).

Thresholds for a grid of other p_x (format 2, serve-time activation sparsity) come from the same
runs: for the first group of a layer (q/k/v, which read the layer input) they are more order
statistics of the same |x| sample, no extra forward pass. The later groups read outputs of the
earlier ones, whose sparsity changes with p_x, so for them each grid point costs one layer forward
on one calibration batch with the earlier groups at that p_x (_probe_dependent_groups). The layer
inputs stay those of the target p_x's stream: served at another p_x the upstream layers sparsify
differently and the realized p_x drifts a little (tests/prune/test_threshold_grid.py bounds it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from duoserve.format.schema import px_grid
from duoserve.prune.activation import ActivationSparsity, maybe, sparsify_threshold
from duoserve.prune.architectures import decoder_layers, layer_targets, sequential_groups
from duoserve.prune.streams import InputRecorder, StopForward, capture_layer_inputs, run_layer

log = logging.getLogger(__name__)


def _rank(q: float, n: int) -> int:
    """1-based rank of the q quantile among n values (the rule every threshold uses)."""
    return max(1, min(n, int(round(q * n))))


def quantile_of_abs(samples: list[torch.Tensor], q: float) -> float:
    """The q quantile of the concatenated |x| samples (exact on what was kept)."""
    values = torch.cat(samples)
    return float(torch.kthvalue(values, _rank(q, values.numel())).values)


def quantiles_of_abs(samples: list[torch.Tensor], qs: tuple[float, ...]) -> list[float]:
    """quantile_of_abs for every q in qs from one partial sort (the same order statistics, bit for
    bit); q = 0 gives 0 (activation sparsity off), not the smallest sample."""
    values = torch.cat(samples).numpy()
    ranks = [_rank(q, values.size) for q in qs]
    # One multi-select is ~2x cheaper than a single torch.kthvalue on 4M values (measured).
    part = np.partition(values, sorted({r - 1 for r in ranks}))
    return [0.0 if q == 0 else float(part[r - 1]) for q, r in zip(qs, ranks)]


# |x| values per linear and grid point in the probes: a quantile of 1M samples is within ~0.001 of
# its rank, and it bounds the probes' ~17 x 4 selections per layer at long windows. Measured on
# SmolLM2-135M, 16 x 256 tokens, one thread: threshold calibration 57 s without probes, 116 s with.
PROBE_VALUES_PER_LINEAR = 1_000_000


class SampleOncePerInput:
    """A random sample of at most `cap` values of |x|, drawn once per input tensor.

    Linears that read the same tensor (q/k/v the layer's normed input, gate/up the MLP's) then get
    the same sample and so the same threshold, bit for bit, and the server runs them as one op call
    on the stacked weight (loaders/linear.py, group_by_threshold). Sampled independently, their
    thresholds differed in the fifth digit and vLLM's fused qkv_proj / gate_up_proj ran as three and
    two calls. The sampled tensors are held until clear(), so no other tensor can reuse their memory
    (the key is the storage address) within one pass.
    """

    def __init__(self, cap: int, gen: torch.Generator):
        self.cap, self.gen = cap, gen
        self._drawn: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.data_ptr(), tuple(x.shape), x.stride())
        hit = self._drawn.get(key)
        if hit is None:
            flat = x.abs().reshape(-1).float().cpu()
            if flat.numel() > self.cap:
                flat = flat[torch.randint(0, flat.numel(), (self.cap,), generator=self.gen)]
            hit = self._drawn[key] = (x, flat)
        return hit[1]

    def clear(self) -> None:
        self._drawn.clear()


@dataclass(frozen=True)
class ThresholdCalibration:
    """The thresholds for the target p_x and for every p_x of `grid` (which contains the target)."""

    target: float
    grid: tuple[float, ...]
    thresholds: dict[str, float]  # module -> threshold at the target
    grid_thresholds: dict[str, list[float]]  # module -> thresholds at grid, non-decreasing

    def to_json(self) -> dict:
        return {"target": self.target, "grid": list(self.grid), "thresholds": self.thresholds,
                "grid_thresholds": self.grid_thresholds}

    @classmethod
    def from_json(cls, d: dict) -> "ThresholdCalibration":
        return cls(float(d["target"]), tuple(d["grid"]), dict(d["thresholds"]),
                   {k: list(v) for k, v in d["grid_thresholds"].items()})


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, windows: torch.Tensor | None, p_x: float, targets: tuple[str, ...],
                         **kwargs) -> dict[str, float]:
    """Module name -> threshold at p_x for every target linear (all 0 when p_x == 0, no data needed)."""
    if p_x == 0 and windows is None:
        layers = decoder_layers(model)
        prefix = next(name for name, m in model.named_modules() if m is layers)
        return {f"{prefix}.{i}.{n}": 0.0 for i, layer in enumerate(layers) for n in layer_targets(layer, targets)}
    return calibrate_threshold_grid(model, windows, p_x, targets, **kwargs).thresholds


@torch.no_grad()
def calibrate_threshold_grid(model: nn.Module, windows: torch.Tensor, p_x: float, targets: tuple[str, ...], *,
                             grid: tuple[float, ...] | None = None, batch_size: int = 4, device="cpu",
                             dtype=torch.float32, max_values_per_linear: int = 4_000_000,
                             seed: int = 0) -> ThresholdCalibration:
    """Thresholds at p_x (applied while calibrating) and at every p_x of the grid (default: 0-0.9
    in steps of 0.05, plus p_x). With p_x = 0 the stream runs dense and the target thresholds are 0."""
    grid = px_grid(p_x) if grid is None else px_grid(p_x, tuple(grid))
    at_target = grid.index(p_x)
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    storage = {i: next(layer.parameters()).dtype for i, layer in enumerate(layers)}
    streams = capture_layer_inputs(model, windows, batch_size, device, dtype)
    hidden = streams.batches
    per_batch = max(1, max_values_per_linear // len(hidden))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # Its own generator: the target thresholds stay those of the single-threshold calibration.
    probe_gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    thresholds: dict[str, float] = {}
    grid_thresholds: dict[str, list[float]] = {}
    for i in tqdm(range(len(layers)), desc="activation thresholds", unit="layer"):
        layer = layers[i].to(device=device, dtype=dtype)
        found = layer_targets(layer, targets)
        groups = sequential_groups(found)
        local: dict[str, float] = {}
        local_grid: dict[str, list[float]] = {}
        kwargs = streams.layer_kwargs[i]
        for group in groups:
            samples: dict[str, list[torch.Tensor]] = {n: [] for n in group}
            draw = SampleOncePerInput(per_batch, gen)

            def collect(name, x):
                samples[name].append(draw(x))

            known = {n: found[n] for n in local}
            # At p_x = 0 every threshold is 0, which keeps every non-zero input: no hooks needed.
            ctx = ActivationSparsity(known, "threshold", thresholds=local) if known and p_x > 0 else None
            with maybe(ctx), InputRecorder({n: found[n] for n in group}, collect) as rec:
                for h in hidden:
                    draw.clear()
                    rec.run(layer, h, kwargs)
            by_sample: dict[tuple[int, ...], list[float]] = {}  # q/k/v (gate/up) hold the same sample tensors
            for n in group:
                key = tuple(map(id, samples[n]))
                if key not in by_sample:
                    by_sample[key] = quantiles_of_abs(samples[n], grid)
                local_grid[n] = list(by_sample[key])  # a copy: the probes below edit grids in place
                local[n] = local_grid[n][at_target]
        _probe_dependent_groups(layer, hidden[0], kwargs, found, groups, grid, at_target, local_grid,
                                probe_gen, min(max_values_per_linear, PROBE_VALUES_PER_LINEAR))
        with maybe(ActivationSparsity(found, "threshold", thresholds=local) if p_x > 0 else None):
            for b in range(len(hidden)):
                hidden[b] = run_layer(layer, hidden[b], kwargs)
        layers[i].to(device="cpu", dtype=storage[i])
        thresholds.update({f"{prefix}.{i}.{n}": t for n, t in local.items()})
        grid_thresholds.update({f"{prefix}.{i}.{n}": g for n, g in local_grid.items()})
        log.debug("layer %d thresholds: %s", i, {n: round(t, 5) for n, t in local.items()})
    return ThresholdCalibration(p_x, grid, thresholds, grid_thresholds)


def _probe_dependent_groups(layer: nn.Module, hidden: torch.Tensor, kwargs, found: dict[str, nn.Linear],
                            groups: list[list[str]], grid: tuple[float, ...], at_target: int,
                            local_grid: dict[str, list[float]], gen: torch.Generator, cap: int) -> None:
    """Re-measure, in place, the grid thresholds of the groups after the first (o_proj reads v_proj's
    output, down_proj gate/up's; gate/up read o_proj's through the residual) with the groups before
    them sparsified at the same grid p_x, on one calibration batch.

    Measured on the target p_x's stream instead, they were off by up to +0.1 realized p_x at 0.75
    and 0.9 on the tiny test model (o_proj's input shrinks when v_proj's is sparser). One layer
    forward per grid point on the first batch: each dependent linear's threshold is the p quantile
    of its input in that very pass, applied at once, so the next group sees it. The first group's
    input (the layer input) keeps the target stream's quantiles: across layers the drift is small.
    """
    dependent = [n for g in groups[1:] for n in g]
    if not dependent:
        return
    first = {n: found[n] for n in groups[0]}
    for j, p in enumerate(grid):
        if p == 0.0 or j == at_target:
            continue
        measured: dict[str, float] = {}
        draw = SampleOncePerInput(cap, gen)
        of_sample: dict[int, float] = {}  # gate/up draw the same sample: one selection for both

        def hook_for(name, p=p, measured=measured, draw=draw, of_sample=of_sample):
            def pre_hook(module, args):
                x = args[0]  # [b, T, K]
                sample = draw(x)
                if id(sample) not in of_sample:
                    of_sample[id(sample)] = quantiles_of_abs([sample], (p,))[0]
                measured[name] = of_sample[id(sample)]
                if len(measured) == len(dependent):
                    raise StopForward  # the rest of the layer changes nothing here
                return (sparsify_threshold(x, measured[name]), *args[1:])

            return pre_hook

        handles = [found[n].register_forward_pre_hook(hook_for(n)) for n in dependent]
        try:
            with ActivationSparsity(first, "threshold", thresholds={n: local_grid[n][j] for n in first}):
                run_layer(layer, hidden, kwargs)
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        for n in dependent:
            local_grid[n][j] = measured[n]
    for n in dependent:
        # Probes at neighbouring p_x see different streams: keep the grid monotone around the
        # (exact, all-batch) target value without moving it.
        g = local_grid[n]
        for j in range(at_target + 1, len(g)):
            g[j] = max(g[j], g[j - 1])
        for j in range(at_target - 1, 0, -1):
            g[j] = min(g[j], g[j + 1])
