"""TEAL-style activation thresholds, calibrated on the pruned model's own activations.

For every target linear, t is the p_x quantile of |x| over calibration tokens and channels
(P(|x| <= t) = p_x), so that keeping |x| > t zeros about p_x of its inputs. Calibration runs
layer by layer and group by group in true-sequential order with the thresholds already chosen
applied, so each linear's threshold is measured on the activations it sees at inference in
threshold mode (the serving kernels' rule).
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from duoserve.prune.activation import ActivationSparsity, maybe
from duoserve.prune.architectures import decoder_layers, layer_targets, sequential_groups
from duoserve.prune.streams import InputRecorder, capture_layer_inputs, run_layer

log = logging.getLogger(__name__)


def quantile_of_abs(samples: list[torch.Tensor], q: float) -> float:
    """The q quantile of the concatenated |x| samples (exact on what was kept)."""
    values = torch.cat(samples)
    k = max(1, min(values.numel(), int(round(q * values.numel()))))
    return float(torch.kthvalue(values, k).values)


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, windows: torch.Tensor, p_x: float, targets: tuple[str, ...], *,
                         batch_size: int = 4, device="cpu", dtype=torch.float32,
                         max_values_per_linear: int = 4_000_000, seed: int = 0) -> dict[str, float]:
    """Module name -> threshold for every target linear (all 0 when p_x == 0)."""
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    if p_x == 0:
        return {f"{prefix}.{i}.{n}": 0.0 for i, layer in enumerate(layers) for n in layer_targets(layer, targets)}
    storage = {i: next(layer.parameters()).dtype for i, layer in enumerate(layers)}
    batch_size = max(b for b in range(1, min(batch_size, windows.shape[0]) + 1) if windows.shape[0] % b == 0)
    streams = capture_layer_inputs(model, windows, batch_size, device, dtype)
    hidden = streams.batches
    per_batch = max(1, max_values_per_linear // len(hidden))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    thresholds: dict[str, float] = {}
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
            ctx = ActivationSparsity(known, "threshold", thresholds=local) if known else None
            with maybe(ctx), InputRecorder({n: found[n] for n in group}, collect) as rec:
                for h in hidden:
                    rec.run(layer, h, kwargs)
            for n in group:
                local[n] = quantile_of_abs(samples[n], p_x)
        with ActivationSparsity(found, "threshold", thresholds=local):
            for b in range(len(hidden)):
                hidden[b] = run_layer(layer, hidden[b], kwargs)
        layers[i].to(device="cpu", dtype=storage[i])
        thresholds.update({f"{prefix}.{i}.{n}": t for n, t in local.items()})
        log.debug("layer %d thresholds: %s", i, {n: round(t, 5) for n, t in local.items()})
    return thresholds
