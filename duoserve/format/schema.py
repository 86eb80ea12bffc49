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
from duoserve.format.allocation_table import ALLOCATION_TOLERANCE, ActivationAllocation, weighted_mean_px

QUANT_METHOD = "duoserve"
# 3: quantized values (int4/int8 codes + per-group scales, `weight_quant`); 2: per-module threshold
# grids (serve-time activation sparsity); 1: one threshold per module. A writer writes the lowest
# version that describes its checkpoint (3 only with quantized values), so that a reader of version
# 2 still reads every unquantized checkpoint.
FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
WEIGHT_FORMATS = ("bitmask", "dense")
QUANT_BITS = (4, 8)
QUANT_SCHEMES = ("symmetric",)
# A group is a whole number of bitmask bytes (8 columns), so a group's kept values can be counted
# from byte popcounts; 128 is the usual group of int4 weight-only formats (GPTQ, AWQ).
QUANT_GROUP_MULTIPLE = 8
DEFAULT_QUANT_GROUP = 128

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_IGNORE = ("lm_head", "embed_tokens")
# p_x values `duoserve prune` calibrates thresholds for (plus the target itself, see px_grid).
DEFAULT_PX_GRID = tuple(round(0.05 * i, 2) for i in range(19))  # 0, 0.05, ..., 0.9

BITMASK_SUFFIX = ".weight_bitmask"
VALUES_SUFFIX = ".weight_values"
SCALES_SUFFIX = ".weight_scales"
DENSE_SUFFIX = ".weight"
THRESHOLD_SUFFIX = ".act_threshold"
BIAS_SUFFIX = ".bias"

MANIFEST_NAME = "duoserve-manifest.json"
BITMASK_SHARD_PATTERN = "duoserve-{index:05d}-of-{count:05d}.safetensors"
DENSE_SINGLE_NAME = "model.safetensors"
DENSE_SHARD_PATTERN = "model-{index:05d}-of-{count:05d}.safetensors"
DENSE_INDEX_NAME = "model.safetensors.index.json"

_NM_RE = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class TensorSpec:
    """One on-disk tensor of a target module (docs/checkpoint-format.md, "Tensors"): the one
    description the writer's reader (format/io.py), the serve-time validator (loaders/validate.py)
    and the vLLM linear method (loaders/linear.py) all check against."""

    suffix: str  # after the module name, e.g. ".weight_bitmask"
    shape: tuple[int, ...]  # () for a scalar
    dtype: str | None  # safetensors dtype ("U8", "F32"); None: the checkpoint's weight dtype
    stacks: str  # how a fused vLLM layer (qkv_proj, gate_up_proj) stacks its shards: "rows", "values", "shards"

    @property
    def param(self) -> str:
        """The parameter name the vLLM linear method gives it ("weight_bitmask", "act_threshold", ...)."""
        return self.suffix.lstrip(".")


@dataclass(frozen=True)
class WeightQuant:
    """Quantized values (format 3, bitmask only): `bits`-bit codes with one scale per group of
    `group_size` input columns of a row (columns [g G, (g + 1) G) of row n share scale[n, g]).

    scheme "symmetric": code c in [0, 2^bits) stands for (c - 2^(bits-1) + 1/2) * scale, a grid of
    2^bits levels symmetric about 0 *without* a zero level (a stored value is a kept weight, so it
    is never 0: "non-zero iff kept" holds for the dequantized weight too); the scale is any float16
    > 0: round to nearest uses the group's largest kept |w| / (2^(bits-1) - 1/2), the joint OBS
    methods refit it by least squares (prune/obs.py; docs/checkpoint-format.md).
    """

    bits: int
    group_size: int = DEFAULT_QUANT_GROUP
    scheme: str = "symmetric"
    scale_dtype: str = "float16"

    def __post_init__(self):
        if self.bits not in QUANT_BITS:
            raise CheckpointError(f"weight_quant.bits {self.bits!r} is not one of {list(QUANT_BITS)}")
        if (not isinstance(self.group_size, int) or self.group_size <= 0
                or self.group_size % QUANT_GROUP_MULTIPLE):
            raise CheckpointError(f"weight_quant.group_size {self.group_size!r} is not a positive multiple of "
                                  f"{QUANT_GROUP_MULTIPLE}")
        if self.scheme not in QUANT_SCHEMES:
            raise CheckpointError(f"weight_quant.scheme {self.scheme!r} is not one of {list(QUANT_SCHEMES)}")
        if self.scale_dtype != "float16":
            raise CheckpointError(f"weight_quant.scale_dtype {self.scale_dtype!r} is not 'float16'")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def value_bytes(self, nnz: int) -> int:
        """Bytes of `nnz` codes: one each (int8) or two per byte, low nibble first (int4)."""
        return nnz if self.bits == 8 else (nnz + 1) // 2

    def groups(self, k: int) -> int:
        return -(-k // self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def module_tensor_specs(weight_format: str, shape: tuple[int, int], nnz: int,
                        quant: WeightQuant | None = None) -> tuple[TensorSpec, ...]:
    """The tensors a target module of weight shape [N, K] with `nnz` non-zeros has on disk."""
    n, k = shape
    if quant is not None and weight_format != "bitmask":
        raise CheckpointError(f"weight_quant needs weight_format 'bitmask', not {weight_format!r}")
    if weight_format == "bitmask" and quant is not None:
        weights = (TensorSpec(BITMASK_SUFFIX, (n, (k + 7) // 8), "U8", "rows"),
                   TensorSpec(VALUES_SUFFIX, (quant.value_bytes(nnz),), "U8", "values"),  # row-major codes
                   TensorSpec(SCALES_SUFFIX, (n, quant.groups(k)), "F16", "rows"))
    elif weight_format == "bitmask":
        weights = (TensorSpec(BITMASK_SUFFIX, (n, (k + 7) // 8), "U8", "rows"),  # bit k % 8 of byte k // 8
                   TensorSpec(VALUES_SUFFIX, (nnz,), None, "values"))  # row-major non-zeros
    elif weight_format == "dense":
        weights = (TensorSpec(DENSE_SUFFIX, (n, k), None, "rows"),)  # zeros in place
    else:
        raise CheckpointError(f"weight_format {weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    return weights + (TensorSpec(THRESHOLD_SUFFIX, (), "F32", "shards"),)


def is_duoserve_checkpoint(path) -> bool:
    """True if `path` is a folder whose config.json names quant_method "duoserve" (cheap: reads
    only config.json; whether the checkpoint is valid is read_quant_config's / the validator's job)."""
    import json
    from pathlib import Path

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


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


def px_grid(target: float, base: tuple[float, ...] = DEFAULT_PX_GRID) -> tuple[float, ...]:
    """The p_x grid a prune calibrates: `base` plus the target, so the target is a grid point."""
    return tuple(sorted(set(base) | {float(target)}))


@dataclass(frozen=True)
class ModuleInfo:
    """One target linear: its weight shape [out, in], stored non-zeros and activation threshold.

    act_threshold_grid (format 2, optional): the thresholds for activation_sparsity.grid, in order.
    """

    shape: tuple[int, int]
    nnz: int
    act_threshold: float = 0.0
    act_threshold_grid: tuple[float, ...] | None = None

    def __post_init__(self):
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise CheckpointError(f"module shape {self.shape} is not [out, in] with positive sizes")
        if not 0 <= self.nnz <= self.shape[0] * self.shape[1]:
            raise CheckpointError(f"module nnz {self.nnz} outside [0, {self.shape[0] * self.shape[1]}]")
        if math.isnan(self.act_threshold) or self.act_threshold < 0:
            raise CheckpointError(f"act_threshold {self.act_threshold} must be a number >= 0")
        g = self.act_threshold_grid
        if g is not None:
            if any(not math.isfinite(t) or t < 0 for t in g):
                raise CheckpointError(f"act_threshold_grid {list(g)} has a value that is not a finite number >= 0")
            if any(b < a for a, b in zip(g, g[1:])):
                raise CheckpointError(f"act_threshold_grid {list(g)} decreases: thresholds must be non-decreasing "
                                      "in p_x (they are quantiles of |x|)")

    def to_dict(self) -> dict[str, Any]:
        d = {"shape": list(self.shape), "nnz": self.nnz, "act_threshold": self.act_threshold}
        if self.act_threshold_grid is not None:
            d["act_threshold_grid"] = list(self.act_threshold_grid)
        return d


@dataclass(frozen=True)
class ActivationSparsity:
    """How inputs of target linears are sparsified at inference.

    rule "threshold": x_k is kept iff |x_k| > t (t per module, calibrated); "none": dense inputs.
    target is the p_x the thresholds were calibrated for (what is served by default). grid (format
    2, optional): the p_x values every module also has thresholds for (serve-time choice).
    """

    rule: str = "none"
    target: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    grid: tuple[float, ...] | None = None
    allocation: ActivationAllocation | None = None  # optional: layer-adaptive p_x (needs the grid)

    def __post_init__(self):
        if self.rule not in ("none", "threshold"):
            raise CheckpointError(f"activation_sparsity.rule {self.rule!r} is not 'none' or 'threshold'")
        if not 0.0 <= self.target < 1.0:
            raise CheckpointError(f"activation_sparsity.target {self.target} is outside [0, 1)")
        g = self.grid
        if g is not None:
            if not g or g[0] != 0.0 or any(b <= a for a, b in zip(g, g[1:])) or not g[-1] < 1.0:
                raise CheckpointError(f"activation_sparsity.grid {list(g)} is not an increasing list of p_x in "
                                      "[0, 1) that starts at 0")
            if self.target not in g:
                raise CheckpointError(f"activation_sparsity.grid {list(g)} lacks the target p_x {self.target}")


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
    # None: the lowest version that describes this config (3 with weight_quant, else 2).
    format_version: int | None = None
    quant_method: str = QUANT_METHOD
    weight_quant: WeightQuant | None = None  # format 3: quantized values

    def __post_init__(self):
        if self.format_version is None:
            object.__setattr__(self, "format_version", 3 if self.weight_quant is not None else 2)
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
        if self.weight_quant is not None:
            if self.format_version < 3:
                raise CheckpointError(f"weight_quant needs format_version 3, the file says {self.format_version}")
            if self.weight_format != "bitmask":
                raise CheckpointError(f"weight_quant needs weight_format 'bitmask', not {self.weight_format!r}")
        self._check_grid()
        self._check_allocation()

    def _check_grid(self) -> None:
        """Format 2's optional grid: on the config and on every module, or nowhere; consistent."""
        grid = self.activation_sparsity.grid
        with_grid = [n for n, m in self.modules.items() if m.act_threshold_grid is not None]
        if grid is None:
            if with_grid:
                raise CheckpointError(f"modules[{with_grid[0]!r}] has an act_threshold_grid but "
                                      "activation_sparsity.grid is missing")
            return
        if self.format_version < 2:
            raise CheckpointError(f"activation_sparsity.grid needs format_version 2, the file says "
                                  f"{self.format_version}")
        # The grid entry at the target equals act_threshold as `duoserve prune` writes it; readers
        # do not rely on it (the target p_x is always served from act_threshold), so tools may
        # edit act_threshold alone.
        for name, m in self.modules.items():
            g = m.act_threshold_grid
            if g is None or len(g) != len(grid):
                raise CheckpointError(f"modules[{name!r}].act_threshold_grid has "
                                      f"{'no' if g is None else len(g)} values, activation_sparsity.grid has "
                                      f"{len(grid)}")
            if g[0] != 0.0:
                raise CheckpointError(f"modules[{name!r}].act_threshold_grid starts at {g[0]}; the threshold "
                                      "at p_x 0 is 0 (activation sparsity off)")

    def _check_allocation(self) -> None:
        """The optional allocation table: over a grid, for exactly the target modules, every target
        met by the K*N-weighted mean, no p_x above the grid's last point."""
        alloc, act = self.activation_sparsity.allocation, self.activation_sparsity
        if alloc is None:
            return
        if act.grid is None:
            raise CheckpointError("activation_sparsity.allocation needs activation_sparsity.grid (the thresholds "
                                  "it selects from)")
        if set(alloc.modules) != set(self.modules):
            odd = sorted(set(alloc.modules) ^ set(self.modules))
            raise CheckpointError(f"activation_sparsity.allocation.modules and modules differ (e.g. {odd[0]!r})")
        top = max(max(ps) for ps in alloc.modules.values())
        if top > act.grid[-1] + 1e-9:
            raise CheckpointError(f"activation_sparsity.allocation has a p_x {top} above the grid's last point "
                                  f"{act.grid[-1]}")
        for i, t in enumerate(alloc.targets):
            mean = weighted_mean_px(self.modules, {n: ps[i] for n, ps in alloc.modules.items()})
            if abs(mean - t) > ALLOCATION_TOLERANCE:
                raise CheckpointError(f"activation_sparsity.allocation at target {t}: the K*N-weighted mean p_x of "
                                      f"the modules is {mean:.6f}, not the target")

    # -- (de)serialization -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["modules"] = {name: info.to_dict() for name, info in self.modules.items()}
        d["targets"], d["ignore"] = list(self.targets), list(self.ignore)
        grid = d["activation_sparsity"].pop("grid")
        if grid is not None:  # format 1 files stay exactly as they were
            d["activation_sparsity"]["grid"] = list(grid)
        d["activation_sparsity"].pop("allocation")
        if self.activation_sparsity.allocation is not None:  # additive: absent unless computed
            d["activation_sparsity"]["allocation"] = self.activation_sparsity.allocation.to_dict()
        order = ["quant_method", "format_version", "weight_format", "dtype", "weight_quant", "targets", "ignore",
                 "sparsity_structure", "global_sparsity", "activation_sparsity", "producer", "modules"]
        if d["weight_quant"] is None:  # format 1 and 2 files stay exactly as they were
            order.remove("weight_quant")
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
                name: ModuleInfo(tuple(m["shape"]), int(m["nnz"]), float(m.get("act_threshold", 0.0)),
                                 _floats(m.get("act_threshold_grid")))
                for name, m in d["modules"].items()
            }
            act = d.get("activation_sparsity") or {}
            wq = d.get("weight_quant")
            if wq is not None and not isinstance(wq, dict):
                raise CheckpointError("quantization_config.weight_quant is not a JSON object")
            if wq is not None and d["format_version"] < 3:
                raise CheckpointError(f"weight_quant needs format_version 3, the file says {d['format_version']}")
            return cls(
                weight_quant=None if wq is None else WeightQuant(
                    bits=wq["bits"], group_size=wq.get("group_size", DEFAULT_QUANT_GROUP),
                    scheme=wq.get("scheme", "symmetric"), scale_dtype=wq.get("scale_dtype", "float16")),
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
                    calibration=dict(act.get("calibration", {})), grid=_floats(act.get("grid")),
                    allocation=(None if act.get("allocation") is None
                                else ActivationAllocation.from_dict(act["allocation"])),
                ),
                producer=dict(d.get("producer", {})),
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"quantization_config is malformed: {type(e).__name__}: {e}") from e


def _floats(values) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def is_target(module_name: str, targets: tuple[str, ...] | list[str]) -> bool:
    """True if the last component of a module name is one of the target projection names."""
    return module_name.rsplit(".", 1)[-1] in targets
