"""Magnitude pruning: score |W_ij|, prune the lowest fraction of every output row (or N:M)."""
from __future__ import annotations

import torch

from duoserve.prune.registry import LinearObserver, PruningMethod, register
from duoserve.prune.sparsity import select_prune_mask


class MagnitudeObserver(LinearObserver):
    def __init__(self, method: "Magnitude"):
        self.method = method

    def prune(self, weight: torch.Tensor) -> torch.Tensor:
        mask = select_prune_mask(weight.abs(), self.method.target, per="row")  # [N, K] True = prune
        return weight.masked_fill(mask, 0.0)


@register("magnitude")
class Magnitude(PruningMethod):
    summary = "|W| per output row; no calibration data"
    needs_calibration = False

    def observer(self, name, linear):
        return MagnitudeObserver(self)
