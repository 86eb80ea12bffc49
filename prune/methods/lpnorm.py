"""l_p-norm reweighting of relative importance (Yi & Richtarik, Sec. 3.5.1, App. C.2-C.3).

With a = ||W_j:||_p and c = ||W_:k||_p (paper's [in x out] notation; our column and row norms):
    S1 = |W_jk| (1/a + 1/c)        (eq. 3, the default; p = 1 is RIA's RI)
    S2 = |W_jk| / (a + c)
    S3 = |W_jk| (a + c)
    S4 = |W_jk| / (1/a + 1/c)
each multiplied by ||X_:j||^alpha as RIA does (Table 8 uses alpha = 0.5, p = 1; Table 7 alpha = 1).
p may be any positive number or inf (`--norm-p inf`); the paper reports p in {1, 2, 3, 4, inf}.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from duoserve.prune.methods.ria import ALPHA_HELP, SCOPE_HELP
from duoserve.prune.methods.symmetric_scores import STRATEGIES, apply_scores, check_scope, ria_scores
from duoserve.prune.methods.wanda import InputNormObserver
from duoserve.prune.registry import PruningMethod, register


@dataclass(frozen=True)
class LpNormOptions:
    norm_p: float = field(default=1.0, metadata={"help": "p of the l_p row/column norms (a number > 0 or inf)"})
    strategy: str = field(default="s1", metadata={"help": "reweighting strategy s1 (default), s2, s3 or s4 (App. C.3)"})
    alpha: float = field(default=0.5, metadata={"help": ALPHA_HELP})
    mask_scope: str = field(default="layer", metadata={"help": SCOPE_HELP})

    def __post_init__(self):
        if not self.norm_p > 0:
            raise ValueError(f"norm_p must be > 0 (or inf), got {self.norm_p}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        check_scope(self.mask_scope)


class LpNormObserver(InputNormObserver):
    def prune(self, weight):
        o = self.method.options
        scores = ria_scores(weight, self.input_norm(weight.device), o.alpha, p=o.norm_p, strategy=o.strategy)
        return apply_scores(weight, scores, self.method.target, o.mask_scope)


@register("lpnorm")
class LpNorm(PruningMethod):
    summary = "l_p relative importance, strategies S1-S4 (Yi & Richtarik App. C.3)"
    Options = LpNormOptions

    def observer(self, name, linear):
        return LpNormObserver(self, linear.in_features)
