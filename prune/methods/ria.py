"""RIA (Zhang et al. 2024, "Plug-and-Play"), as re-derived by Yi & Richtarik (Theorem 3.5, eq. 2).

    RIA_jk = |W_jk| (1 / ||W_j:||_1 + 1 / ||W_:k||_1) * ||X_:j||_2^alpha

in the paper's [in x out] notation; in our [out, in] tensor: |W[k, j]| (1 / colsum_j + 1 / rowsum_k)
* ||X_j||^alpha (prune/methods/symmetric_scores.py). alpha = 0.5 is the paper's best (Table 3).

Options beyond the paper's defaults:
- `relative` = col / row: the Col-Sum / Row-Sum ablations of Table 3 (only one of the two terms).
  "col" is the column of our [out, in] tensor (the sum over outputs of one input channel), as in
  RIA's code; see docs/symmetric.md for the mapping to the paper's transposed notation.
- `mask_scope`: RIA's reference code selects the lowest scores over the whole layer (the relative
  normalization makes rows comparable); "row" selects per output row as Wanda does. With N:M the
  groups decide and the scope does not matter.
||X_:j|| is measured on the pruned stream's inputs before activation sparsity, like Wanda's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from duoserve.prune.methods.symmetric_scores import (RELATIVE_MODES, apply_scores, check_scope,
                                                     ria_scores)
from duoserve.prune.methods.wanda import InputNormObserver
from duoserve.prune.registry import PruningMethod, register

ALPHA_HELP = "power alpha on the input-channel norm ||X_j||^alpha (0 = no activations)"
SCOPE_HELP = "unstructured masks over the whole 'layer' (RIA's code) or per output 'row' (Wanda's)"


@dataclass(frozen=True)
class RIAOptions:
    alpha: float = field(default=0.5, metadata={"help": ALPHA_HELP})
    relative: str = field(default="both", metadata={
        "help": "both (RIA), col (Col-Sum: 1/sum over outputs of each input) or row (Row-Sum) of Table 3"})
    mask_scope: str = field(default="layer", metadata={"help": SCOPE_HELP})

    def __post_init__(self):
        if self.relative not in RELATIVE_MODES:
            raise ValueError(f"relative must be one of {', '.join(RELATIVE_MODES)}, got {self.relative!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        check_scope(self.mask_scope)


class RIAObserver(InputNormObserver):
    def prune(self, weight):
        o = self.method.options
        scores = ria_scores(weight, self.input_norm(weight.device), o.alpha, p=1.0, relative=o.relative)
        return apply_scores(weight, scores, self.method.target, o.mask_scope)


@register("ria")
class RIA(PruningMethod):
    summary = "relative importance |W|(1/||W_col||_1 + 1/||W_row||_1) ||X_j||^alpha (Zhang et al. 2024)"
    Options = RIAOptions

    def observer(self, name, linear):
        return RIAObserver(self, linear.in_features)
