"""stochRIA (Yi & Richtarik, Sec. 3.5.2, eq. 4, Lemma 3.10): RIA with sampled l1 sums.

    S_jk = |W_jk| (1 / ||W_{j,S_j}||_1 + 1 / ||W_{S_k,k}||_1) * ||X_:j||^alpha

S_j, S_k: tau indices drawn uniformly without replacement, independently for every line.
tau = round(beta * min(b, c)) for rows and columns alike (the paper's definition, App. C.4:
"ratios are applied over min(b, c)"); with `sample_base = line` each line samples round(beta *
its own length) instead, so that beta = 1 is exactly RIA for every shape (with "min" only square
matrices are). The paper's Table 2 uses alpha = 1; we default to RIA's alpha = 0.5.

Seeding: every linear gets its own generator, seeded from `sample_seed`, the module's name in its
layer and a CRC of its (dense) weight bytes, so layers differ, runs repeat, and a resumed run
draws the same subsets as an uninterrupted one.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from duoserve.prune.methods.ria import ALPHA_HELP, SCOPE_HELP
from duoserve.prune.methods.symmetric_scores import apply_scores, check_scope, stochria_scores
from duoserve.prune.methods.wanda import InputNormObserver
from duoserve.prune.registry import PruningMethod, register

SAMPLE_BASES = ("min", "line")


@dataclass(frozen=True)
class StochRIAOptions:
    beta: float = field(default=0.1, metadata={"help": "sampling ratio beta in (0, 1]: tau = beta * min(N, K)"})
    sample_seed: int = field(default=0, metadata={"help": "seed of the stochRIA index sampling"})
    sample_base: str = field(default="min", metadata={
        "help": "tau from min(N, K) (the paper) or from each line's own length ('line': beta = 1 is RIA)"})
    alpha: float = field(default=0.5, metadata={"help": ALPHA_HELP})
    mask_scope: str = field(default="layer", metadata={"help": SCOPE_HELP})

    def __post_init__(self):
        if not 0 < self.beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {self.beta}")
        if self.sample_base not in SAMPLE_BASES:
            raise ValueError(f"sample_base must be one of {', '.join(SAMPLE_BASES)}, got {self.sample_base!r}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        check_scope(self.mask_scope)


def sample_sizes(n: int, k: int, beta: float, base: str) -> tuple[int, int]:
    """(tau for each output row of K entries, tau for each input column of N entries)."""
    if base == "min":
        tau = max(1, round(beta * min(n, k)))
        return tau, tau
    return max(1, round(beta * k)), max(1, round(beta * n))


def linear_generator(seed: int, name: str, weight: torch.Tensor) -> torch.Generator:
    crc = zlib.crc32(weight.detach().float().cpu().contiguous().numpy().tobytes())
    crc = zlib.crc32(name.encode(), crc)
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B1 + crc) % (2 ** 63))


class StochRIAObserver(InputNormObserver):
    def __init__(self, method, in_features, name):
        super().__init__(method, in_features)
        self.name = name

    def prune(self, weight):
        o = self.method.options
        tau_row, tau_col = sample_sizes(weight.shape[0], weight.shape[1], o.beta, o.sample_base)
        gen = linear_generator(o.sample_seed, self.name, weight)
        scores = stochria_scores(weight, self.input_norm(weight.device), o.alpha, tau_row, tau_col, gen)
        return apply_scores(weight, scores, self.method.target, o.mask_scope)


@register("stochria")
class StochRIA(PruningMethod):
    summary = "RIA with l1 sums over random subsets of beta * min(N, K) entries (Yi & Richtarik)"
    Options = StochRIAOptions

    def observer(self, name, linear):
        return StochRIAObserver(self, linear.in_features, name)
