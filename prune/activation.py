"""Activation sparsity: per-token top-k (the papers' rule) and calibrated thresholds (TEAL; serving).

`sparsify_topk(x, p)` zeros, in every token, the floor(p * K) entries of smallest magnitude.
`sparsify_threshold(x, t)` keeps x_k iff |x_k| > t, exactly the rule of the serving kernels
(docs/checkpoint-format.md), so in-process evaluation in threshold mode computes what is served.
`ActivationSparsity` installs either rule on the target linears of a model with forward
pre-hooks and can count the realized sparsity per module.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

import torch
from torch import nn

ACTIVATION_MODES = ("topk", "threshold", "off")


def sparsify_topk(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero the floor(p * K) smallest-|x| entries of every token (last dim). x: [..., K]."""
    k_drop = int(x.shape[-1] * p)
    if k_drop <= 0:
        return x
    idx = torch.topk(x.abs(), k_drop, dim=-1, largest=False).indices  # [..., k_drop]
    return x.scatter(-1, idx, 0.0)


def sparsify_threshold(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """x * (|x| > t): the serving kernels' rule, compared in fp32 as the kernels do.

    Comparing a bf16 tensor with a Python float rounds the threshold to bf16 (type promotion
    keeps the tensor's dtype), which flips inputs near t and makes in-process evaluation differ
    from what is served. NaN inputs are dropped, as in the kernels.
    """
    return torch.where(x.float().abs() > float(threshold), x, torch.zeros((), dtype=x.dtype, device=x.device))


class ActivationSparsity:
    """Forward pre-hooks that sparsify the inputs of the given linears.

    mode "topk": every linear drops p of each token's inputs; mode "threshold": each linear uses
    its own threshold from `thresholds`. With `record=True`, `realized()` returns the measured
    fraction of zero inputs per module (over all tokens seen).
    """

    def __init__(self, modules: dict[str, nn.Linear], mode: str, *, p: float = 0.0,
                 thresholds: dict[str, float] | None = None, record: bool = False):
        if mode not in ACTIVATION_MODES:
            raise ValueError(f"activation mode {mode!r} not in {ACTIVATION_MODES}")
        if mode == "threshold":
            missing = sorted(set(modules) - set(thresholds or {}))
            if missing:
                raise ValueError(f"no activation threshold for {missing[:3]}{'...' if len(missing) > 3 else ''}")
        self.modules, self.mode, self.p = modules, mode, p
        self.thresholds = thresholds or {}
        self.record = record
        self._zeros: dict[str, int] = defaultdict(int)
        self._total: dict[str, int] = defaultdict(int)
        self._handles: list = []

    def _hook(self, name: str):
        def pre_hook(module, args):
            x = args[0]
            if self.mode == "topk":
                y = sparsify_topk(x, self.p)
            elif self.mode == "threshold":
                y = sparsify_threshold(x, self.thresholds[name])
            else:
                y = x
            if self.record:
                self._zeros[name] += int((y == 0).sum())
                self._total[name] += y.numel()
            return (y, *args[1:])

        return pre_hook

    def __enter__(self) -> "ActivationSparsity":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def realized(self) -> dict[str, float]:
        return {name: self._zeros[name] / self._total[name] for name in self._total if self._total[name]}


@contextlib.contextmanager
def maybe(ctx) -> Iterator[None]:
    """`with maybe(ctx_or_None):` — enter ctx when there is one."""
    if ctx is None:
        yield
    else:
        with ctx:
            yield
