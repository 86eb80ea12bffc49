"""Sparsity targets and exact mask selection.

A target is either unstructured (a fraction p in [0, 1)) or N:M (at most N non-zeros in every M
consecutive weights of a row). Every selector here prunes *exactly* the requested count (ties
broken by index through topk), so realized sparsity equals the target wherever the scores are
finite; the tests rely on that.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from duoserve.errors import InputError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class SparsityTarget:
    """What to prune: `fraction` for unstructured, (n, m) for N:M (n kept of every m)."""

    fraction: float
    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def structure(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    def __str__(self) -> str:
        return self.structure if self.is_nm else f"{self.fraction:g}"

    @staticmethod
    def parse(text: str | float) -> "SparsityTarget":
        """'0.5' -> 50% unstructured; '2:4' -> 2:4. Raises InputError with the accepted forms."""
        if isinstance(text, (int, float)):
            text = str(text)
        m = _NM.match(text)
        if m:
            n, mm = int(m.group(1)), int(m.group(2))
            if not 0 < n < mm:
                raise InputError(f"sparsity {text!r}: N:M needs 0 < N < M (e.g. 2:4 keeps 2 of every 4)")
            return SparsityTarget(fraction=1.0 - n / mm, n=n, m=mm)
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"sparsity {text!r} is neither a fraction in [0, 1) (e.g. 0.5) nor N:M (e.g. 2:4)") from None
        if not (0.0 <= value < 1.0) or math.isnan(value):
            raise InputError(f"sparsity {value} is outside [0, 1); use e.g. 0.5 for 50% of weights pruned")
        return SparsityTarget(fraction=value)


def prune_lowest_per_row(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean prune mask [N, K]: the floor(fraction * K) lowest scores of every row."""
    n_prune = int(scores.shape[1] * fraction)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_prune > 0:
        idx = torch.topk(scores, n_prune, dim=1, largest=False).indices  # [N, n_prune]
        mask.scatter_(1, idx, True)
    return mask


def prune_lowest_overall(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean prune mask of scores' shape: the floor(fraction * numel) lowest scores overall."""
    flat = scores.reshape(-1)
    n_prune = int(flat.numel() * fraction)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if n_prune > 0:
        mask[torch.topk(flat, n_prune, largest=False).indices] = True
    return mask.view_as(scores)


def prune_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean prune mask [N, K]: in every group of m consecutive columns, the m - n lowest.

    K must be a multiple of m (checked by the caller with a clear message).
    """
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)  # [N, K/m, m]
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def check_nm_compatible(target: SparsityTarget, in_features: int, name: str) -> None:
    if target.is_nm and in_features % target.m:
        raise InputError(f"{name}: {in_features} input features are not a multiple of M = {target.m} "
                         f"for {target.structure} sparsity")


def select_prune_mask(scores: torch.Tensor, target: SparsityTarget, per: str = "row") -> torch.Tensor:
    """The prune mask for a target: N:M groups, or unstructured per row / over the whole tensor."""
    if target.is_nm:
        return prune_nm(scores, target.n, target.m)
    if per == "row":
        return prune_lowest_per_row(scores, target.fraction)
    if per == "all":
        return prune_lowest_overall(scores, target.fraction)
    raise ValueError(f"per must be 'row' or 'all', got {per!r}")
