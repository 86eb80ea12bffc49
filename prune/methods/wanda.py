"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, prune the lowest per output row; no update.

||X_j|| is the L2 norm of input channel j over all calibration tokens, measured by default on the
inputs before activation sparsity, as in the DuoGPT paper's dual-sparse Wanda baseline;
`--norm-inputs sparsified` measures it on the top-k sparsified inputs the served linear sees (the
same data SparseGPT and DuoGPT calibrate on), so the baseline can be compared at its best setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from duoserve.prune.activation import sparsify_topk
from duoserve.prune.registry import LinearObserver, PruningMethod, register
from duoserve.prune.sparsity import select_prune_mask

NORM_INPUTS = ("unsparsified", "sparsified")


@dataclass(frozen=True)
class WandaOptions:
    norm_inputs: str = field(default="unsparsified", metadata={
        "help": "inputs whose channel norms score the weights: unsparsified (the paper's dual-sparse baseline) "
                "or sparsified (after top-k activation sparsity at --activation-sparsity, as served)"})

    def __post_init__(self):
        if self.norm_inputs not in NORM_INPUTS:
            raise ValueError(f"norm_inputs must be one of {', '.join(NORM_INPUTS)}, got {self.norm_inputs!r}")


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
    def add_batch(self, x, x_dense):
        p_x = self.method.activation_sparsity
        if self.method.options.norm_inputs == "sparsified" and p_x > 0:
            x = sparsify_topk(x, p_x)  # [T, K]
        super().add_batch(x, x_dense)

    def prune(self, weight):
        scores = weight.abs() * self.input_norm(weight.device).unsqueeze(0)  # [N, K]
        mask = select_prune_mask(scores, self.method.target, per="row")
        return weight.masked_fill(mask, 0.0)


@register("wanda")
class Wanda(PruningMethod):
    summary = "|W| * ||X_j||_2 per output row (Sun et al. 2023)"
    Options = WandaOptions

    def observer(self, name, linear):
        return WandaObserver(self, linear.in_features)
