"""The layer-adaptive allocation table of a checkpoint (`activation_sparsity.allocation`,
docs/checkpoint-format.md): per-linear p_x for a list of average targets. No torch here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from duoserve.errors import CheckpointError

if TYPE_CHECKING:
    from duoserve.format.schema import ModuleInfo


ALLOCATION_METHODS = ("greedy",)  # besides "uniform" (every linear at the asked p_x), which needs no table
# How close a stored table's parameter-weighted mean p_x must be to its target (rounding of 6 decimals).
ALLOCATION_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ActivationAllocation:
    """Per-linear p_x for a list of average targets (`activation_sparsity.allocation`, optional).

    method "greedy": TEAL's block-wise greedy allocation (duoserve.prune.allocation). For every
    target T, `modules[name][i]` is the p_x of that linear at `targets[i]`; the mean of the p_x over
    all target linears weighted by their K*N equals T. `info` says how it was computed (objective,
    calibration windows): provenance only, readers do not interpret it.
    """

    method: str
    targets: tuple[float, ...]
    modules: dict[str, tuple[float, ...]]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in ALLOCATION_METHODS:
            raise CheckpointError(f"activation_sparsity.allocation.method {self.method!r} is not one of "
                                  f"{list(ALLOCATION_METHODS)}")
        t = self.targets
        if not t or any(not (isinstance(x, float) and 0.0 < x < 1.0) for x in t) or any(b <= a for a, b in zip(t, t[1:])):
            raise CheckpointError(f"activation_sparsity.allocation.targets {list(t)} is not an increasing list of "
                                  "average p_x in (0, 1)")
        for name, ps in self.modules.items():
            if len(ps) != len(t):
                raise CheckpointError(f"activation_sparsity.allocation.modules[{name!r}] has {len(ps)} values, "
                                      f"targets has {len(t)}")
            if any(not (math.isfinite(p) and 0.0 <= p < 1.0) for p in ps) or any(b < a for a, b in zip(ps, ps[1:])):
                raise CheckpointError(f"activation_sparsity.allocation.modules[{name!r}] {list(ps)} is not a "
                                      "non-decreasing list of p_x in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "targets": list(self.targets), "info": dict(self.info),
                "modules": {n: list(ps) for n, ps in self.modules.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActivationAllocation":
        if not isinstance(d, dict):
            raise CheckpointError("activation_sparsity.allocation is not a JSON object")
        return cls(method=d["method"], targets=tuple(float(x) for x in d["targets"]),
                   modules={n: tuple(float(p) for p in ps) for n, ps in d["modules"].items()},
                   info=dict(d.get("info", {})))


def weighted_mean_px(modules: dict[str, "ModuleInfo"], px: dict[str, float]) -> float:
    """The mean of per-module p_x weighted by each linear's K*N (the columns a kernel skips, in
    weights: the speed model of activation sparsity)."""
    total = sum(m.shape[0] * m.shape[1] for m in modules.values())
    return sum(m.shape[0] * m.shape[1] * px[n] for n, m in modules.items()) / total
