"""The sequential pruning engine: layer by layer, group by group, one or two calibration streams.

For decoder layer i (SparseGPT's sequential protocol, algorithms.md):
1. groups in true-sequential order ([q,k,v] -> [o] -> [gate,up] -> [down]): run the layer on the
   pruned stream, hand each group linear's inputs to its method observer (and, for methods that
   need it, the same tokens' inputs in the dense model, from a copy of the original layer run on
   the dense stream), then let the observers prune; later groups see earlier pruned groups;
2. propagate: the pruned layer maps the pruned stream to layer i+1's inputs; the original layer
   maps the dense stream. When activation sparsity is on, the pruned stream runs with it (per-token
   top-k on every target input), as the model will at inference;
3. log (layer, realized sparsity, relative reconstruction error of the layer's residual branch,
   seconds) and store the layer in the work folder so a killed run can resume.

Methods never see hooks, devices or streams (prune/registry.py).
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from duoserve.format.quant import round_to_nearest
from duoserve.prune.activation import ActivationSparsity, maybe
from duoserve.prune.architectures import decoder_layers, layer_targets, sequential_groups
from duoserve.prune.registry import PruningMethod
from duoserve.prune.streams import InputRecorder, capture_layer_inputs, run_layer
from duoserve.prune.workdir import WorkDir

log = logging.getLogger(__name__)

SCALES_KEY = ".weight_scales"  # a layer file's extra tensors with --quantize: "<linear>.weight_scales"
SCALES_ATTR = "duoserve_weight_scales"  # --quantize: a pruned linear's scales [N, ceil(K/G)] fp16
# Fault injection for the resume tests: the process kills itself (SIGKILL) after this layer.
FAULT_ENV = "_DUOSERVE_TEST_FAULT_AFTER_LAYER"  # private: a test hook, not a setting (docs/configuration.md)


@dataclass(frozen=True)
class EngineSettings:
    batch_size: int = 4
    device: str = "cpu"
    dtype: torch.dtype = torch.float32  # calibration math and layer forwards
    error_batches: int = 2  # batches used for the logged reconstruction error


class SequentialEngine:
    def __init__(self, model: nn.Module, method: PruningMethod, targets: tuple[str, ...],
                 settings: EngineSettings, workdir: WorkDir | None = None):
        self.model, self.method, self.targets = model, method, targets
        self.settings, self.workdir = settings, workdir
        self.layers = decoder_layers(model)
        # The dtype the pruned weights are stored in (the model's own, e.g. bf16).
        self.storage_dtype = next(iter(layer_targets(self.layers[0], targets).values())).weight.dtype

    # ----------------------------------------------------------------------------------------
    def run(self, windows: torch.Tensor | None) -> list[dict[str, Any]]:
        if not self.method.needs_calibration:
            return self._run_without_data()
        s = self.settings
        streams = capture_layer_inputs(self.model, windows, s.batch_size, s.device, s.dtype)
        dense = [b.clone() for b in streams.batches] if self.method.needs_dense_stream else None
        logs = []
        for i in tqdm(range(len(self.layers)), desc=f"{self.method.name}: layers", unit="layer"):
            logs.append(self._process_layer(i, streams.batches, dense, streams.layer_kwargs[i]))
        return logs

    def _sparsity_ctx(self, found: dict[str, nn.Linear]):
        p_x = self.method.activation_sparsity
        return ActivationSparsity(found, "topk", p=p_x) if p_x > 0 else None

    @torch.no_grad()
    def _process_layer(self, i: int, hidden: list[torch.Tensor], dense: list[torch.Tensor] | None,
                       kwargs: dict[str, Any]) -> dict[str, Any]:
        s, t0 = self.settings, time.time()
        layer = self.layers[i].to(device=s.device, dtype=s.dtype)  # in place
        original = copy.deepcopy(layer)  # the dense layer: target for the dense stream and the error
        found = layer_targets(layer, self.targets)
        original_found = layer_targets(original, self.targets)
        resumed = self.workdir is not None and i < self.workdir.layers_done
        if resumed:
            saved = self.workdir.load_layer(i)
            for name, linear in found.items():
                linear.weight.data = saved[name].to(device=s.device, dtype=s.dtype)
                if self.method.quantize is not None:
                    setattr(linear, SCALES_ATTR, saved[name + SCALES_KEY])
        else:
            for group in sequential_groups(found):
                self._prune_group(layer, original, group, found, original_found, hidden, dense, kwargs)

        # Propagate both streams; measure the layer's reconstruction error on a few batches.
        err_num = err_den = 0.0
        for b in range(len(hidden)):
            with maybe(self._sparsity_ctx(found)):
                out = run_layer(layer, hidden[b], kwargs)
            if not resumed and b < s.error_batches:
                ref = run_layer(original, hidden[b], kwargs)
                err_num += float(((out - ref) ** 2).sum())
                err_den += float(((ref - hidden[b]) ** 2).sum())
            if dense is not None:
                dense[b] = run_layer(original, dense[b], kwargs)
            hidden[b] = out
        del original

        zeros = sum(int((m.weight == 0).sum()) for m in found.values())
        total = sum(m.weight.numel() for m in found.values())
        self.layers[i].to(device="cpu", dtype=self.storage_dtype)
        if resumed:
            entry = self.workdir.layer_logs[i]
            log.info("layer %d: resumed from %s", i, self.workdir.path)
            return entry
        entry = {"layer": i, "sparsity": round(zeros / total, 6),
                 "reconstruction_error": round(err_num / max(err_den, 1e-30), 6),
                 "seconds": round(time.time() - t0, 2)}
        log.info("layer %d/%d: sparsity %.4f, reconstruction error %.3e, %.1f s", i + 1, len(self.layers),
                 entry["sparsity"], entry["reconstruction_error"], entry["seconds"])
        if self.workdir is not None:
            saved = {n: m.weight.data.to(self.storage_dtype) for n, m in found.items()}
            if self.method.quantize is not None:
                saved.update({n + SCALES_KEY: getattr(m, SCALES_ATTR) for n, m in found.items()})
            self.workdir.save_layer(i, saved, entry)
        if os.environ.get(FAULT_ENV) == str(i):
            os.kill(os.getpid(), signal.SIGKILL)
        return entry

    def _prune_group(self, layer, original, group, found, original_found, hidden, dense, kwargs) -> None:
        observers = {n: self.method.observer(n, found[n]) for n in group}
        dense_inputs: dict[str, torch.Tensor] = {}

        def observe(name, x):
            observers[name].add_batch(x.float(), dense_inputs.get(name))

        for b in range(len(hidden)):
            if dense is not None:
                with InputRecorder({n: original_found[n] for n in group},
                                   lambda n, x: dense_inputs.__setitem__(n, x.float())) as rec:
                    rec.run(original, dense[b], kwargs)
            with maybe(self._sparsity_ctx(found)), InputRecorder({n: found[n] for n in group}, observe) as rec:
                rec.run(layer, hidden[b], kwargs)
        for name in group:
            weight = self._quantized(found[name], observers[name].prune(found[name].weight.data.float()))
            # Round to the stored dtype now, so later layers calibrate on the weights that ship.
            found[name].weight.data = weight.to(self.storage_dtype).to(self.settings.dtype)
        observers.clear()

    def _quantized(self, linear: nn.Linear, result) -> torch.Tensor:
        """A method's result -> the weight to keep; with --quantize, the linear keeps its scales
        as `duoserve_weight_scales` (a joint method returns them; any other result is rounded to
        the nearest level here), which the checkpoint writer reads."""
        quant = self.method.quantize
        if quant is None:
            return result
        if isinstance(result, tuple):
            weight, scales = result
        else:
            weight, scales = round_to_nearest(result, quant)
        setattr(linear, SCALES_ATTR, scales.to(torch.float16).cpu())
        return weight

    @torch.no_grad()
    def _run_without_data(self) -> list[dict[str, Any]]:
        logs = []
        for i in tqdm(range(len(self.layers)), desc=f"{self.method.name}: layers", unit="layer"):
            t0 = time.time()
            found = layer_targets(self.layers[i], self.targets)
            for name, linear in found.items():
                weight = self._quantized(linear, self.method.observer(name, linear).prune(linear.weight.data.float()))
                linear.weight.data = weight.to(linear.weight.dtype)
            zeros = sum(int((m.weight == 0).sum()) for m in found.values())
            total = sum(m.weight.numel() for m in found.values())
            entry = {"layer": i, "sparsity": round(zeros / total, 6), "reconstruction_error": None,
                     "seconds": round(time.time() - t0, 2)}
            log.info("layer %d/%d: sparsity %.4f, reconstruction error n/a (no calibration data), %.2f s",
                     i + 1, len(self.layers), entry["sparsity"], entry["seconds"])
            logs.append(entry)
        return logs
