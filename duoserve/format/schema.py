"""Names and metadata of the duoserve checkpoint (docs/checkpoint-format.md): no torch here.

This module is the single source of truth for tensor names, file names and the
`quantization_config` schema. Both the writer (duoserve.prune) and the readers
(duoserve.loaders, duoserve eval/inspect) import it; it imports nothing heavy.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from duoserve.errors import CheckpointError

QUANT_METHOD = "duoserve"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
WEIGHT_FORMATS = ("bitmask", "dense")

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_IGNORE = ("lm_head", "embed_tokens")

BITMASK_SUFFIX = ".weight_bitmask"
VALUES_SUFFIX = ".weight_values"
DENSE_SUFFIX = ".weight"
THRESHOLD_SUFFIX = ".act_threshold"
BIAS_SUFFIX = ".bias"

MANIFEST_NAME = "duoserve-manifest.json"
BITMASK_SHARD_PATTERN = "duoserve-{index:05d}-of-{count:05d}.safetensors"
DENSE_SINGLE_NAME = "model.safetensors"
DENSE_SHARD_PATTERN = "model-{index:05d}-of-{count:05d}.safetensors"
DENSE_INDEX_NAME = "model.safetensors.index.json"

_NM_RE = re.compile(r"^(\d+):(\d+)$")


def parse_structure(value: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M.

    As in the pruning literature (2:4), at most N of every M consecutive weights of a row are
    non-zero, so the sparsity is 1 - N/M.
    """
    if value == "unstructured":
        return None
    m = _NM_RE.match(value)
    if not m:
        raise CheckpointError(f"sparsity_structure {value!r} is neither 'unstructured' nor 'N:M'")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise CheckpointError(f"sparsity_structure {value!r}: need 0 < N < M")
    return n, mm


@dataclass(frozen=True)
class ModuleInfo:
    """One target linear: its weight shape [out, in], stored non-zeros and activation threshold."""

    shape: tuple[int, int]
    nnz: int
    act_threshold: float = 0.0

    def __post_init__(self):
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise CheckpointError(f"module shape {self.shape} is not [out, in] with positive sizes")
        if not 0 <= self.nnz <= self.shape[0] * self.shape[1]:
            raise CheckpointError(f"module nnz {self.nnz} outside [0, {self.shape[0] * self.shape[1]}]")
        if math.isnan(self.act_threshold) or self.act_threshold < 0:
            raise CheckpointError(f"act_threshold {self.act_threshold} must be a number >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "nnz": self.nnz, "act_threshold": self.act_threshold}


@dataclass(frozen=True)
class ActivationSparsity:
    """How inputs of target linears are sparsified at inference.

    rule "threshold": x_k is kept iff |x_k| > t (t per module, calibrated); "none": dense inputs.
    target is the p_x the thresholds were calibrated for.
    """

    rule: str = "none"
    target: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.rule not in ("none", "threshold"):
            raise CheckpointError(f"activation_sparsity.rule {self.rule!r} is not 'none' or 'threshold'")
        if not 0.0 <= self.target < 1.0:
            raise CheckpointError(f"activation_sparsity.target {self.target} is outside [0, 1)")


@dataclass(frozen=True)
class QuantizationConfig:
    """`config.json["quantization_config"]` of a duoserve checkpoint, validated on construction."""

    weight_format: str
    dtype: str
    modules: dict[str, ModuleInfo]
    targets: tuple[str, ...] = DEFAULT_TARGETS
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    sparsity_structure: str = "unstructured"
    global_sparsity: float = 0.0
    activation_sparsity: ActivationSparsity = field(default_factory=ActivationSparsity)
    producer: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    quant_method: str = QUANT_METHOD

    def __post_init__(self):
        if self.quant_method != QUANT_METHOD:
            raise CheckpointError(f"quant_method is {self.quant_method!r}, not {QUANT_METHOD!r}")
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise CheckpointError(
                f"format_version {self.format_version!r} is not supported by this duoserve "
                f"(supported: {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade duoserve or re-prune"
            )
        if self.weight_format not in WEIGHT_FORMATS:
            raise CheckpointError(f"weight_format {self.weight_format!r} is not one of {list(WEIGHT_FORMATS)}")
        parse_structure(self.sparsity_structure)

    # -- (de)serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules"] = {name: info.to_dict() for name, info in self.modules.items()}
        d["targets"], d["ignore"] = list(self.targets), list(self.ignore)
        order = ["quant_method", "format_version", "weight_format", "dtype", "targets", "ignore",
                 "sparsity_structure", "global_sparsity", "activation_sparsity", "producer", "modules"]
        return {k: d[k] for k in order}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizationConfig":
        if not isinstance(d, dict):
            raise CheckpointError("quantization_config is not a JSON object")
        if d.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(f"quantization_config.quant_method is {d.get('quant_method')!r}, not {QUANT_METHOD!r}")
        if "format_version" not in d:
            raise CheckpointError("quantization_config has no format_version")
        # Check the version before anything else: a future format may change every other field.
        if d["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
            raise CheckpointError(
                f"format_version {d['format_version']!r} is not supported by this duoserve "
                f"(supported: {list(SUPPORTED_FORMAT_VERSIONS)}); upgrade duoserve or re-prune"
            )
        try:
            modules = {
                name: ModuleInfo(tuple(m["shape"]), int(m["nnz"]), float(m.get("act_threshold", 0.0)))
                for name, m in d["modules"].items()
            }
            act = d.get("activation_sparsity") or {}
            return cls(
                quant_method=d["quant_method"],
                format_version=d["format_version"],
                weight_format=d["weight_format"],
                dtype=d["dtype"],
                modules=modules,
                targets=tuple(d.get("targets", DEFAULT_TARGETS)),
                ignore=tuple(d.get("ignore", DEFAULT_IGNORE)),
                sparsity_structure=d.get("sparsity_structure", "unstructured"),
                global_sparsity=float(d.get("global_sparsity", 0.0)),
                activation_sparsity=ActivationSparsity(
                    rule=act.get("rule", "none"), target=float(act.get("target", 0.0)),
                    calibration=dict(act.get("calibration", {})),
                ),
                producer=dict(d.get("producer", {})),
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"quantization_config is malformed: {type(e).__name__}: {e}") from e


def is_target(module_name: str, targets: tuple[str, ...] | list[str]) -> bool:
    """True if the last component of a module name is one of the target projection names."""
    return module_name.rsplit(".", 1)[-1] in targets
