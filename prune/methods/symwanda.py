"""SymWanda (Yi & Richtarik, Sec. 3.2): input and output activations in one score.

Variants (`--variant`), in the paper's [in x out] notation (prune/methods/symmetric_scores.py):
- sum (Lemma 3.1, the default):  |W_jk| (||X_:j||_2 + ||Y_k:||_2), from the non-squared (Sym) objective
- squared (Appendix B):          |W_jk| sqrt(||X_:j||^2 + ||Y_k:||^2), from the squared objective
- weight (Corollary 3.4):        |W_jk| (||W_j:||_2 + ||W_:k||_2), X = Y = W^T (no data)
- relative (Lemma 3.7, A = X, B = Y): |W_jk| (||X_:j|| / ||W_j:||_1 + ||Y_k:|| / ||W_:k||_1)
X: the linear's inputs on the pruned stream (before activation sparsity); Y = X W^T its dense
outputs. Both norms are sums over the same tokens, so they share a scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from duoserve.prune.methods.ria import SCOPE_HELP
from duoserve.prune.methods.symmetric_scores import OutputNormObserver, apply_scores, check_scope, symwanda_scores
from duoserve.prune.registry import PruningMethod, register

VARIANTS = ("sum", "squared", "weight", "relative")


@dataclass(frozen=True)
class SymWandaOptions:
    variant: str = field(default="sum", metadata={
        "help": "symwanda score: sum (Lemma 3.1), squared (App. B), weight (Cor. 3.4) or relative (Lemma 3.7)"})
    mask_scope: str = field(default="layer", metadata={"help": SCOPE_HELP})

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        check_scope(self.mask_scope)


class SymWandaObserver(OutputNormObserver):
    def prune(self, weight):
        o = self.method.options
        if o.variant == "weight":
            scores = symwanda_scores(weight, None, None, "weight")
        else:
            scores = symwanda_scores(weight, self.input_norm(weight.device), self.output_norm(weight.device), o.variant)
        return apply_scores(weight, scores, self.method.target, o.mask_scope)


@register("symwanda")
class SymWanda(PruningMethod):
    summary = "symmetric Wanda |W| (||X_j|| + ||Y_k||) and variants (Yi & Richtarik)"
    Options = SymWandaOptions

    def observer(self, name, linear):
        data = self.options.variant != "weight"
        return SymWandaObserver(self, linear, need_input=data, need_output=data)
