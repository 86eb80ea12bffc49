"""Pure-torch dual-sparse linear: the test oracle and the fallback of every other path.

    y[t, n] = sum_k W[n, k] * xm[t, k] + bias[n],   xm[t, k] = x[t, k] if |x[t, k]| > thr else 0

computed in fp32 and returned in x's dtype. `torch.where` (not x * mask) so that a masked NaN or
inf input contributes exactly 0. thr = 0 keeps every non-zero input; thr = inf drops all of them.
"""
from __future__ import annotations

import torch

from .layout import PackedWeight, unpack_dense


def as_threshold(threshold, device) -> torch.Tensor:
    """float or tensor -> fp32 0-dim tensor on `device` (the form the custom ops take)."""
    if isinstance(threshold, torch.Tensor):
        return threshold.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.full((), float(threshold), dtype=torch.float32, device=device)


def mask_activations(x: torch.Tensor, threshold) -> torch.Tensor:
    """x [..., K] -> x with every |x| <= threshold set to 0 (same dtype).

    The comparison is in fp32 (|x| is exact in fp32 for every input dtype): comparing in bf16
    would round the threshold, and every kernel compares in fp32.
    """
    t = as_threshold(threshold, x.device)
    keep = x.abs().float() > t  # [..., K] bool
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def dual_sparse_linear_reference(x: torch.Tensor, dense_weight: torch.Tensor, threshold,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], dense_weight [N, K] (zeros where pruned), bias [N] | None -> [..., N] in x.dtype.

    fp32 accumulation on x's device.
    """
    xm = mask_activations(x, threshold).float()  # [..., K] fp32
    y = xm @ dense_weight.float().t()  # [..., N] fp32
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dual_sparse_linear_packed_reference(x: torch.Tensor, packed: PackedWeight, threshold,
                                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same op on a PackedWeight: unpacks to dense (transiently) and calls the oracle.

    Used as the fallback where no native kernel applies; it syncs (it sizes tensors from the
    packed data), so it is not CUDA-graph safe.
    """
    return dual_sparse_linear_reference(x, unpack_dense(packed), threshold, bias)
