"""DSnoT (Zhang et al. 2023, "Dynamic Sparse No Training"): training-free prune-and-grow per row.

Grow the pruned weight with the largest sign(E[eps_q]) W_qr E[x_r] / Var(x_r); prune the kept
weight with the smallest Wanda score |W'_qr| ||x_r|| among those whose removal moves the mean error
E[eps_q] toward zero; stop a row after `max_cycles` swaps, once |E[eps_q]| <= `update_threshold`,
or when a swap would flip the sign of E[eps_q]. Defaults as in the papers' implementation details
(max cycles 50, threshold 0.1, power of the variance 1). The loop and the objective (which inputs
it uses after DuoGPT and with activation sparsity) are in prune/refiners/prune_grow.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from duoserve.prune.refiners import RefineObserver, Refiner, register_refiner
from duoserve.prune.refiners.prune_grow import PruneGrowSettings, RefineStats, prune_and_grow

RESIDUAL_SCALE_HELP = ("factor s on the residual in the refinement target X^ + s (X~ - X^) (default: the base method's "
                       "residual_scale, e.g. DuoGPT's 0.25, so refiner and base minimize one objective; 1 for bases "
                       "without one)")
GUARD_HELP = ("accept a swap only if it lowers the row's squared reconstruction error on the calibration "
              "batch (off: the papers' rule, which tracks the mean error only)")


@dataclass(frozen=True)
class DSnoTOptions:
    max_cycles: int = field(default=50, metadata={"help": "at most this many prune-and-grow swaps per row"})
    update_threshold: float = field(default=0.1, metadata={"help": "stop a row once |E[eps]| is at most this"})
    var_power: float = field(default=1.0, metadata={"help": "power of Var(x) in the growing criterion"})
    guard: bool = field(default=True, metadata={"help": GUARD_HELP})
    residual_scale: float | None = field(default=None, metadata={"help": RESIDUAL_SCALE_HELP})

    def __post_init__(self):
        if self.max_cycles < 0:
            raise ValueError(f"max_cycles must be >= 0, got {self.max_cycles}")
        if not self.update_threshold >= 0:
            raise ValueError(f"update_threshold must be >= 0, got {self.update_threshold}")
        if not self.var_power >= 0:
            raise ValueError(f"var_power must be >= 0, got {self.var_power}")
        if self.residual_scale is not None and not self.residual_scale >= 0:
            raise ValueError(f"residual_scale must be >= 0, got {self.residual_scale}")

    def settings(self) -> PruneGrowSettings:
        return PruneGrowSettings(max_cycles=self.max_cycles, update_threshold=self.update_threshold,
                                 var_power=self.var_power, alpha=1.0, guard=self.guard)


def target_residual_scale(options: DSnoTOptions, method) -> float:
    """The refiner's factor on X~ - X^: its own option if given, else the base method's, else 1.

    DuoGPT calibrates toward X^ + s (X~ - X^) with s < 1; a refiner aiming at the full X~ would
    pull the weights back toward the objective the base deliberately shrank (docs/results.md,
    "Symmetric family", has both measured). With `--residual-scale auto` DuoGPT's s is chosen per
    linear only when the base solves, after the refiner's statistics are collected, so the refiner
    then aims at 0.5."""
    if options.residual_scale is not None:
        return options.residual_scale
    scale = getattr(method.options, "residual_scale", 1.0)
    return AUTO_SCALE_FOR_REFINERS if scale == "auto" else float(scale)


AUTO_SCALE_FOR_REFINERS = 0.5


class PruneGrowObserver(RefineObserver):
    def __init__(self, refiner: Refiner, method, name: str, linear):
        self.refiner, self.method, self.name = refiner, method, name
        self.stats = RefineStats(linear.in_features, linear.weight.device, method.activation_sparsity,
                                 use_dense=method.needs_dense_stream,
                                 residual_scale=target_residual_scale(refiner.options, method))

    def add_batch(self, x, x_dense):
        self.stats.add(x, x_dense)

    def refine(self, dense, pruned):
        weight, info = prune_and_grow(dense, pruned, self.stats, self.method.target, self.refiner.options.settings())
        self.refiner.record(info)
        return weight


class PruneGrowRefiner(Refiner):
    """Shared by DSnoT and R^2-DSnoT: observers, and a tally of the swaps for the run's log."""

    def __init__(self, options=None):
        super().__init__(options)
        self.totals = {"rows": 0, "active_rows": 0, "swaps": 0, "rejected_by_guard": 0}

    def record(self, info: dict) -> None:
        for key in self.totals:
            self.totals[key] += info[key]

    def observer(self, method, name, linear):
        return PruneGrowObserver(self, method, name, linear)


@register_refiner("dsnot")
class DSnoT(PruneGrowRefiner):
    summary = "prune-and-grow on the mean reconstruction error (Zhang et al. 2023)"
    Options = DSnoTOptions
