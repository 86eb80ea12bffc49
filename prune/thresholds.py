"""TEAL-style activation thresholds, calibrated on the pruned model's own activations.

For every target linear, t is the p_x quantile of |x| over calibration tokens and channels
(P(|x| <= t) = p_x), so that keeping |x| > t zeros about p_x of its inputs. Calibration runs
layer by layer and group by group in true-sequential order with the thresholds already chosen
applied, so each linear's threshold is measured on the activations it sees at inference in
threshold mode (the serving kernels' rule).

The same |x| sample of each linear also gives its thresholds for a grid of other p_x (format 2,
serve-time activation sparsity): more order statistics of the sample, no extra forward pass. Those
are measured on the stream sparsified at the target p_x, so they are exact for the linear's own
input distribution there; served at another p_x the upstream linears sparsify differently and the
realized p_x drifts slightly from the nominal one (tests/prune/test_threshold_grid.py bounds it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from duoserve.format.schema import px_grid
from duoserve.prune.activation import ActivationSparsity, maybe
from duoserve.prune.architectures import decoder_layers, layer_targets, sequential_groups
from duoserve.prune.streams import InputRecorder, capture_layer_inputs, run_layer

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
    batch_size = max(b for b in range(1, min(batch_size, windows.shape[0]) + 1) if windows.shape[0] % b == 0)
    streams = capture_layer_inputs(model, windows, batch_size, device, dtype)
    hidden = streams.batches
    per_batch = max(1, max_values_per_linear // len(hidden))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    thresholds: dict[str, float] = {}
    grid_thresholds: dict[str, list[float]] = {}
    for i in tqdm(range(len(layers)), desc="activation thresholds", unit="layer"):
        layer = layers[i].to(device=device, dtype=dtype)
        found = layer_targets(layer, targets)
        local: dict[str, float] = {}
        kwargs = streams.layer_kwargs[i]
        for group in sequential_groups(found):
            samples: dict[str, list[torch.Tensor]] = {n: [] for n in group}

            def collect(name, x):
                flat = x.abs().reshape(-1).float().cpu()
                if flat.numel() > per_batch:
                    flat = flat[torch.randint(0, flat.numel(), (per_batch,), generator=gen)]
                samples[name].append(flat)

            known = {n: found[n] for n in local}
            # At p_x = 0 every threshold is 0, which keeps every non-zero input: no hooks needed.
            ctx = ActivationSparsity(known, "threshold", thresholds=local) if known and p_x > 0 else None
            with maybe(ctx), InputRecorder({n: found[n] for n in group}, collect) as rec:
                for h in hidden:
                    rec.run(layer, h, kwargs)
            for n in group:
                values = quantiles_of_abs(samples[n], grid)
                local[n] = values[at_target]
                grid_thresholds[f"{prefix}.{i}.{n}"] = values
        with maybe(ActivationSparsity(found, "threshold", thresholds=local) if p_x > 0 else None):
            for b in range(len(hidden)):
                hidden[b] = run_layer(layer, hidden[b], kwargs)
        layers[i].to(device="cpu", dtype=storage[i])
        thresholds.update({f"{prefix}.{i}.{n}": t for n, t in local.items()})
        log.debug("layer %d thresholds: %s", i, {n: round(t, 5) for n, t in local.items()})
    return ThresholdCalibration(p_x, grid, thresholds, grid_thresholds)
