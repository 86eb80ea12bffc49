"""OWanda, output-side Wanda (Yi & Richtarik, Corollary 3.3): S_jk = |W_jk| ||Y_k:||_2.

Y_k: is output channel k of this linear on the calibration tokens (y = x W^T, the dense weight on
the pruned stream's inputs; see OutputNormObserver). ||Y_k|| is constant along an output row, so
per-row selection (and N:M, whose groups lie in one row) reduces OWanda to magnitude pruning:
the output term only matters when the mask is chosen over the whole layer, the default here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from duoserve.prune.methods.ria import SCOPE_HELP
from duoserve.prune.methods.symmetric_scores import OutputNormObserver, apply_scores, check_scope, symwanda_scores
from duoserve.prune.registry import PruningMethod, register


@dataclass(frozen=True)
class OWandaOptions:
    mask_scope: str = field(default="layer", metadata={"help": SCOPE_HELP})

    def __post_init__(self):
        check_scope(self.mask_scope)


class OWandaObserver(OutputNormObserver):
    def prune(self, weight):
        scores = symwanda_scores(weight, None, self.output_norm(weight.device), "sum")
        return apply_scores(weight, scores, self.method.target, self.method.options.mask_scope)


@register("owanda")
class OWanda(PruningMethod):
    summary = "output-side Wanda |W| * ||Y_k||_2 (Yi & Richtarik, Cor. 3.3)"
    Options = OWandaOptions

    def observer(self, name, linear):
        return OWandaObserver(self, linear, need_input=False)
