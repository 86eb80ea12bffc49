"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, prune the lowest per output row; no update.

||X_j|| is the L2 norm of input channel j over all calibration tokens, measured on the dense
(not activation-sparsified) inputs, as in the DuoGPT paper's dual-sparse Wanda baseline.
"""
from __future__ import annotations

import torch

from duoserve.prune.registry import LinearObserver, PruningMethod, register
from duoserve.prune.sparsity import select_prune_mask


class InputNormObserver(LinearObserver):
    """Accumulates the squared L2 norm of every input channel; scoring is left to subclasses."""

    def __init__(self, method: PruningMethod, in_features: int):
        self.method = method
        self.sq_norm = torch.zeros(in_features, dtype=torch.float64)  # [K] sum_t x_tj^2
        self.tokens = 0

    def add_batch(self, x, x_dense):
        self.sq_norm += (x.double() ** 2).sum(0).cpu()
        self.tokens += x.shape[0]

    def input_norm(self, device) -> torch.Tensor:
        return self.sq_norm.sqrt().to(device=device, dtype=torch.float32)  # [K]


class WandaObserver(InputNormObserver):
    def prune(self, weight):
        scores = weight.abs() * self.input_norm(weight.device).unsqueeze(0)  # [N, K]
        mask = select_prune_mask(scores, self.method.target, per="row")
        return weight.masked_fill(mask, 0.0)


@register("wanda")
class Wanda(PruningMethod):
    summary = "|W| * ||X_j||_2 per output row (Sun et al. 2023)"

    def observer(self, name, linear):
        return WandaObserver(self, linear.in_features)
