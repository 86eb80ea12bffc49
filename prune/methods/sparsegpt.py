"""SparseGPT (Frantar & Alistarh 2023): blocked OBS pruning with lazy updates (prune/obs.py).

With --activation-sparsity p_x > 0 it calibrates on activation-sparsified inputs X^ (each token's
p_x smallest-|x| inputs zeroed), the dual-sparse SparseGPT baseline of the DuoGPT paper.
Defaults follow the SparseGPT paper: dampening 0.01, B = 128, no act_order.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

from duoserve.errors import InputError
from duoserve.prune.activation import sparsify_topk
from duoserve.prune.obs import HessianStats, ObsSettings, heldout_pruned_scale, obs_prune
from duoserve.prune.registry import LinearObserver, PruningMethod, register

log = logging.getLogger(__name__)

# With residual_scale "auto", this fraction of every calibration batch's tokens (its last rows:
# whole windows at the engine's default of 4 windows per batch) is held out to choose the scale
# whose pruned weights do best there (prune/obs.py, heldout_pruned_scale).
HELDOUT_FRACTION = 0.25


@dataclass(frozen=True)
class ObsOptions:
    blocksize: int = field(default=128, metadata={"help": "columns per block of mask selection and lazy update"})
    damp: float = field(default=0.01, metadata={"help": "dampening, as a fraction of mean(diag H)"})
    act_order: bool = field(default=False, metadata={"help": "process columns by decreasing diag(H)"})

    def __post_init__(self):
        if self.blocksize <= 0:
            raise ValueError(f"blocksize must be positive, got {self.blocksize}")
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0 (Cholesky of H needs it), got {self.damp}")


class ObsObserver(LinearObserver):
    def __init__(self, method: PruningMethod, in_features: int, device, with_residual: bool, settings: ObsSettings,
                 name: str = "", residual_parts: tuple[float, float] = (1.0, 1.0)):
        self.method, self.name = method, name
        self.residual_parts = residual_parts  # shares of dX's (dropped, upstream) parts
        self.stats = HessianStats(in_features, with_residual, device)
        self.settings = settings
        # "auto": statistics of held-out tokens as well (they stay in self.stats: the final solve
        # uses every token, the held-out split only chooses the scale).
        self.heldout = (HessianStats(in_features, True, device, with_gap=True)
                        if settings.residual_scale == "auto" else None)

    def add_batch(self, x, x_dense):
        p_x = self.method.activation_sparsity
        x_hat = sparsify_topk(x, p_x) if p_x > 0 else x  # [T, K]
        if x_dense is not None and self.residual_parts != (1.0, 1.0):
            # dX = x_dense - x_hat = (x - x_hat) + (x_dense - x): the activations this linear drops
            # plus the upstream part (the earlier layers' pruning error); weigh the two.
            dropped, upstream = self.residual_parts
            x_dense = x_hat + dropped * (x - x_hat) + upstream * (x_dense - x)
        self.stats.add(x_hat, x_dense if self.stats.G is not None else None)
        if self.heldout is not None:
            h = max(1, int(round(x_hat.shape[0] * HELDOUT_FRACTION)))
            self.heldout.add(x_hat[-h:], x_dense[-h:])

    def prune(self, weight):
        settings = self.settings
        if self.heldout is not None:
            choice, _ = heldout_pruned_scale(weight, self.stats.without(self.heldout), self.heldout,
                                             self.method.target, settings)
            log.info("%s: residual scale %.3f (chosen on %d held-out calibration tokens, whose objective is %.1f%% "
                     "lower than at scale 0 there, %.1f%% at scale 1)", self.name, choice.scale,
                     self.heldout.tokens, 100 * choice.reduction, 100 * choice.reduction_at_1)
            settings = dataclasses.replace(settings, residual_scale=choice.scale)
        quant = self.method.quantize if self.method.joint_quantization else None
        return obs_prune(weight, self.stats, self.method.target, settings, quant=quant)


def check_nm_blocksize(method: PruningMethod) -> None:
    t, opts = method.target, method.options
    if t.is_nm and opts.blocksize % t.m:
        raise InputError(f"--blocksize {opts.blocksize} must be a multiple of M = {t.m} for {t.structure}")
    if t.is_nm and opts.act_order is True:
        raise InputError("--act-order permutes columns and would break N:M groups; use it with unstructured sparsity")


@register("sparsegpt")
class SparseGPT(PruningMethod):
    summary = "blocked OBS with lazy updates (Frantar & Alistarh 2023)"
    Options = ObsOptions
    joint_quantization = True  # --quantize: GPTQ-style rounding inside the column loop (prune/obs.py)

    def __init__(self, target, activation_sparsity=0.0, options=None):
        super().__init__(target, activation_sparsity, options)
        check_nm_blocksize(self)

    def observer(self, name, linear):
        o = self.options
        return ObsObserver(self, linear.in_features, linear.weight.device, False,
                           ObsSettings(o.blocksize, o.damp, o.act_order))
