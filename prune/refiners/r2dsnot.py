"""R^2-DSnoT (Yi & Richtarik, Sec. 3.6, eqs. 5-6): DSnoT with relative importance and an l_p regularizer.

    grow  i = argmax_r  s_q W_qr D_qr E[x_r] / Var(x_r) + gamma1 ||W'_q + W_qr e_r||_p
    prune j = argmin_{r: Delta < 0}  |W'_qr| D_qr ||x_r||^alpha + gamma2 ||W'_q - W'_qr e_r||_p
    D_qr = 1/||W'_q,:||_1 + 1/||W'_:,r||_1

Choices where the paper is ambiguous (docs/symmetric.md): D multiplies DSnoT's W_qr E[x]/Var in
eq. 5 (the printed formula drops W_qr, which would lose the direction of the change); the
regularizer is the l_p norm of the row *after* the candidate move (the current row's norm is the
same for every candidate and could not change the argmax); D is applied in the growing *or* the
pruning criterion as the flags say. Defaults are the best setting of Table 10 (Wanda base):
p = 2, relative importance in growing only, gamma1 = 0, gamma2 = 1e-4, alpha = 0.5 (the
"square-root activation"), with DSnoT's max cycles 50 and threshold 0.1. ||x_r|| is the RMS of the
channel over the calibration tokens, so gamma's scale differs from the paper's sum over a window.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from duoserve.prune.refiners import register_refiner
from duoserve.prune.refiners.dsnot import DSnoTOptions, PruneGrowRefiner
from duoserve.prune.refiners.prune_grow import PruneGrowSettings


@dataclass(frozen=True)
class R2DSnoTOptions(DSnoTOptions):
    """DSnoT's options (cycle limit, update threshold, Var power, guard) plus eqs. 5-6's."""

    grow_relative: bool = field(default=True, metadata={"help": "relative importance D in the growing criterion"})
    prune_relative: bool = field(default=False, metadata={"help": "relative importance D in the pruning criterion"})
    gamma1: float = field(default=0.0, metadata={"help": "weight of the l_p regularizer when growing"})
    gamma2: float = field(default=1e-4, metadata={"help": "weight of the l_p regularizer when pruning"})
    norm_p: float = field(default=2.0, metadata={"help": "p of the regularizer's l_p norm (a number > 0 or inf)"})
    alpha: float = field(default=0.5, metadata={"help": "power of ||x_r|| in the pruning criterion"})

    def __post_init__(self):
        super().__post_init__()
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if not self.gamma1 >= 0 or not self.gamma2 >= 0:
            raise ValueError(f"gamma1 and gamma2 must be >= 0, got {self.gamma1}, {self.gamma2}")
        if not self.norm_p > 0:
            raise ValueError(f"norm_p must be > 0 (or inf), got {self.norm_p}")

    def settings(self) -> PruneGrowSettings:
        return PruneGrowSettings(max_cycles=self.max_cycles, update_threshold=self.update_threshold,
                                 var_power=self.var_power, grow_relative=self.grow_relative,
                                 prune_relative=self.prune_relative, gamma1=self.gamma1, gamma2=self.gamma2,
                                 norm_p=self.norm_p, alpha=self.alpha, guard=self.guard)


@register_refiner("r2dsnot")
class R2DSnoT(PruneGrowRefiner):
    summary = "DSnoT with relative importance and an l_p regularizer (Yi & Richtarik)"
    Options = R2DSnoTOptions
