"""Resumable pruning runs: the `OUT.partial/` work folder.

After each finished decoder layer the engine stores that layer's pruned target weights and its
log line here (atomically). `--resume` reloads the finished layers and replays their forward
passes to rebuild the calibration streams, then continues; the replay runs the same operations on
the same inputs, so the result is bit-identical to an uninterrupted run on the same machine.
The folder remembers the run's settings and refuses to resume a run with different ones.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from duoserve.errors import InputError
from duoserve.format.manifest import write_json_atomic

PROGRESS = "progress.json"


class WorkDir:
    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # normalize (tuples -> lists)
        self.layer_logs: list[dict[str, Any]] = []
        self.threshold_calibration = None  # a duoserve.prune.thresholds.ThresholdCalibration once saved

    @property
    def layers_done(self) -> int:
        return len(self.layer_logs)

    def start(self, resume: bool, overwrite: bool) -> None:
        """Create the folder, or reopen it with --resume; refuse a stale one otherwise."""
        progress = self.path / PROGRESS
        if self.path.exists() and not resume:
            if not overwrite:
                raise InputError(f"{self.path} holds an unfinished run; pass --resume to continue it "
                                 "or --overwrite to start again")
            shutil.rmtree(self.path)
        if resume and progress.is_file():
            state = json.loads(progress.read_text())
            if state["settings"] != self.settings:
                diff = sorted(k for k in set(state["settings"]) | set(self.settings)
                              if state["settings"].get(k) != self.settings.get(k))
                raise InputError(f"cannot resume {self.path}: it was started with different settings "
                                 f"({', '.join(diff)}); rerun with the same options or use --overwrite")
            self.layer_logs = state["layers"]
            # A folder from before threshold grids has only "thresholds": calibrate again (cheap).
            saved = state.get("threshold_calibration")
            if saved is not None:
                from duoserve.prune.thresholds import ThresholdCalibration

                self.threshold_calibration = ThresholdCalibration.from_json(saved)
            return
        (self.path / "layers").mkdir(parents=True, exist_ok=True)
        self._write_progress()

    def _layer_file(self, index: int) -> Path:
        return self.path / "layers" / f"layer-{index:05d}.safetensors"

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], log: dict[str, Any]) -> None:
        if index != self.layers_done:
            raise RuntimeError(f"layer {index} saved out of order (done: {self.layers_done})")
        target = self._layer_file(index)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, target)
        self.layer_logs.append(log)
        self._write_progress()

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self._layer_file(index)))

    def save_threshold_calibration(self, calibration) -> None:
        self.threshold_calibration = calibration
        self._write_progress()

    def _write_progress(self) -> None:
        cal = self.threshold_calibration
        write_json_atomic(self.path / PROGRESS, {"settings": self.settings, "layers": self.layer_logs,
                                                 "threshold_calibration": None if cal is None else cal.to_json()})

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
