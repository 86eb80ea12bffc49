"""The prune-and-grow loop shared by DSnoT (Zhang et al. 2023) and R^2-DSnoT (Yi & Richtarik, Sec. 3.6).

Objective. For output row q the reconstruction error over the calibration tokens is
    eps_q = W_q X~ - W'_q X^
W: the dense weight, W': the current pruned weight; X^: the inputs the pruned linear multiplies
(the pruned stream, with each token's p_x smallest inputs zeroed when activation sparsity is on,
as at inference); X~: the target's inputs: the dense model's stream when the base method
calibrates against it (DuoGPT's ||W' X^ - W X~||), else the pruned stream without activation
sparsity. With p_x = 0 and no dense stream this is DSnoT's eps_q = W_q X - W'_q X. A residual
scale s moves the target to X^ + s (X~ - X^), as DuoGPT's --residual-scale does for its own
objective; the refiners follow the base's scale unless given one (prune/refiners/dsnot.py).

One cycle, for every active row q (all rows in parallel), with mu_r = E[x^_r], v_r = Var(x^_r),
s_q = sign(E[eps_q]) fixed at the start:
- grow i = argmax over pruned r of  s_q W_qr mu_r / v_r^var_power [* D_qr] [+ gamma1 ||W'_q + W_qr e_r||_p]
  restricted to s_q W_qr mu_r > 0 (restoring r moves the mean error toward 0);
- prune j = argmin over kept r with Delta(q, r) = s_q W'_qr mu_r < 0 (in i's N:M group for N:M) of
  |W'_qr| [* D_qr] * RMS(x^_r)^alpha [+ gamma2 ||W'_q - W'_qr e_r||_p];
- D_qr = 1/||W'_q,:||_1 + 1/||W'_:,r||_1 (relative importance, R^2-DSnoT; off in DSnoT);
- DSnoT's rule: swap (W'_qi = W_qi, W'_qj = 0) only while |E[eps_q]| > update_threshold and the
  swap keeps the sign of E[eps_q]; otherwise the row stops. At most max_cycles swaps per row.
- guard (ours, on by default): a swap is also required to lower ||eps_q||^2, computed exactly from
  the Gram matrices: with g_r = <eps_q, x^_r>, H = X^ X^T,
      d||eps_q||^2 = -2 w_i g_i + 2 w_j g_j + w_i^2 H_ii - 2 w_i w_j H_ij + w_j^2 H_jj,
  w_i = W_qi (grown), w_j = W'_qj (pruned). A rejected grow candidate is skipped, the row goes on.
  DSnoT's criteria track the mean error only; the guard makes every accepted swap lower the
  layer's reconstruction error on the calibration batch.
Every swap turns one zero into a non-zero and one non-zero into a zero in the same row (and N:M
group), so the sparsity and N:M pattern are kept exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from duoserve.prune.activation import sparsify_topk
from duoserve.prune.obs import HessianStats
from duoserve.prune.sparsity import SparsityTarget

log = logging.getLogger(__name__)

_TINY = 1e-30
# Relative margin of the guard: the Gram matrices are accumulated in fp32, so a predicted change
# of the squared error is trusted only beyond this fraction of the swap's own terms.
GUARD_MARGIN = 1e-5


@dataclass(frozen=True)
class PruneGrowSettings:
    max_cycles: int = 50
    update_threshold: float = 0.1
    var_power: float = 1.0
    grow_relative: bool = False
    prune_relative: bool = False
    gamma1: float = 0.0
    gamma2: float = 0.0
    norm_p: float = 2.0
    alpha: float = 1.0
    guard: bool = True


class RefineStats:
    """Calibration statistics of one linear in the refinement objective (see the module doc)."""

    def __init__(self, in_features: int, device, p_x: float, use_dense: bool, residual_scale: float = 1.0):
        self.p_x, self.use_dense, self.residual_scale = p_x, use_dense, residual_scale
        self.residual = use_dense or p_x > 0  # X~ differs from X^
        self.hess = HessianStats(in_features, self.residual, device)  # H, G = 2/T X^ X^T, 2/T (X~ - X^) X^T
        k = in_features
        self.sum_hat = torch.zeros(k, dtype=torch.float64, device=device)
        self.sumsq_hat = torch.zeros(k, dtype=torch.float64, device=device)
        self.sum_target = torch.zeros(k, dtype=torch.float64, device=device) if self.residual else None

    def add(self, x: torch.Tensor, x_dense: torch.Tensor | None) -> None:
        """x: [T, K] pruned-stream input before activation sparsity; x_dense: the dense stream's."""
        if self.use_dense and x_dense is None:
            raise ValueError("the refinement objective needs the dense stream's inputs")
        x_hat = sparsify_topk(x, self.p_x) if self.p_x > 0 else x  # [T, K]
        target = x_dense if self.use_dense else x
        if self.residual and self.residual_scale != 1.0:
            target = torch.lerp(x_hat.float(), target.float(), self.residual_scale)  # X^ + s (X~ - X^)
        self.hess.add(x_hat, target if self.residual else None)
        xd = x_hat.double()
        self.sum_hat += xd.sum(0)
        self.sumsq_hat += (xd ** 2).sum(0)
        if self.residual:
            self.sum_target += target.double().sum(0)

    @property
    def tokens(self) -> int:
        return self.hess.tokens


def _norm_after_grow(wc: torch.Tensor, w: torch.Tensor, p: float) -> torch.Tensor:
    """||W'_q + W_qr e_r||_p for every candidate r (W'_qr = 0 there). [R, K]"""
    if math.isinf(p):
        return torch.maximum(wc.abs().amax(1, keepdim=True), w.abs())
    base = wc.abs().pow(p).sum(1, keepdim=True)
    return (base + w.abs().pow(p)).pow(1.0 / p)


def _norm_after_prune(wc: torch.Tensor, p: float) -> torch.Tensor:
    """||W'_q - W'_qr e_r||_p for every candidate r. [R, K]"""
    a = wc.abs()
    if math.isinf(p):
        top = a.topk(min(2, a.shape[1]), dim=1)
        out = top.values[:, :1].expand_as(a).clone()
        second = top.values[:, -1:] if a.shape[1] > 1 else torch.zeros_like(top.values[:, :1])
        out.scatter_(1, top.indices[:, :1], second)
        return out
    base = a.pow(p).sum(1, keepdim=True)
    return (base - a.pow(p)).clamp_min(0).pow(1.0 / p)


@torch.no_grad()
def prune_and_grow(dense: torch.Tensor, pruned: torch.Tensor, stats: RefineStats, target: SparsityTarget,
                   s: PruneGrowSettings) -> tuple[torch.Tensor, dict]:
    """Refine `pruned` [N, K] (the base method's result for `dense`); returns (weight, info).

    Candidate scores are computed once from the base's result and walked in order, one grow and
    one prune pointer per row, as DSnoT's implementation does (so D and the regularizer are those
    of the base's W'; a swap changes a row's norms by about 1/K). For the guard, g = <eps_q, x^_r>
    is the base's g0 plus the swaps made so far in the row (each changes eps_q by w x^_r), so a
    cycle costs O(rows x swaps) instead of updating all of g [N, K]: the refiner stays cheap next
    to the calibration itself.
    """
    dev = pruned.device
    W = dense.to(device=dev, dtype=torch.float64)  # [N, K]
    Wc = pruned.to(dtype=torch.float64).clone()  # [N, K] the current pruned weight W'
    n, k = W.shape
    t = max(stats.tokens, 1)
    mu = (stats.sum_hat / t).to(dev)  # [K] E[x^]
    var = (stats.sumsq_hat / t - mu ** 2).clamp_min(0).to(dev)  # [K] Var(x^)
    rms = (stats.sumsq_hat / t).sqrt().to(dev)  # [K] ||x^_r|| per token
    mu_target = (stats.sum_target / t).to(dev) if stats.sum_target is not None else mu
    H = stats.hess.H.to(dev)  # [K, K] fp32, scale 2/T
    h_diag = torch.diagonal(H).double()

    err_mean = W @ mu_target - Wc @ mu  # [N] E[eps_q]
    sign0 = torch.sign(err_mean)
    active = (sign0 != 0) & (err_mean.abs() > s.update_threshold)
    info = {"rows": n, "active_rows": int(active.sum()), "swaps": 0, "rejected_by_guard": 0, "cycles": 0}
    if not active.any() or s.max_cycles == 0:
        return pruned.clone(), info

    # Static candidate scores (module doc). A dead channel (mu = Var = 0) gains nothing.
    ratio = torch.where(mu == 0, torch.zeros_like(mu), mu / var.pow(s.var_power).clamp_min(_TINY))  # [K]
    s0 = sign0.unsqueeze(1)  # [N, 1]
    if s.grow_relative or s.prune_relative:
        d = (1.0 / Wc.abs().sum(1, keepdim=True).clamp_min(_TINY)
             + 1.0 / Wc.abs().sum(0, keepdim=True).clamp_min(_TINY))  # [N, K] D_qr
    gain = s0 * W * ratio  # [N, K]
    growable = (Wc == 0) & (W != 0) & (gain > 0)  # restoring r moves E[eps_q] toward 0
    gscore = gain * d if s.grow_relative else gain
    if s.gamma1:
        gscore = gscore + s.gamma1 * _norm_after_grow(Wc, W, s.norm_p)
    grow_order = torch.where(growable, gscore, -math.inf).argsort(dim=1, descending=True)  # [N, K]
    n_grow = growable.sum(1)
    prunable = (Wc != 0) & (s0 * Wc * mu < 0)  # Delta(q, r) < 0: pruning r moves E[eps_q] toward 0
    pscore = Wc.abs() * rms.pow(s.alpha)
    if s.prune_relative:
        pscore = pscore * d
    if s.gamma2:
        pscore = pscore + s.gamma2 * _norm_after_prune(Wc, s.norm_p)
    pscore = torch.where(prunable, pscore, math.inf)  # [N, K]
    if target.is_nm:
        offsets = torch.arange(target.m, device=dev)
    else:
        prune_order = pscore.argsort(dim=1)  # [N, K]
        n_prune = prunable.sum(1)
    del gain, gscore, growable
    g0 = ((W - Wc).float() @ H).double()  # [N, K] <eps_q, x^_r> of the base's W' (scale 2/T)
    if stats.hess.G is not None:
        g0 += (W.float() @ stats.hess.G.to(dev)).double()
    # Swap history per row: eps_q changed by sum_h val_h x^_{idx_h} (grown: -W_qi, pruned: +W'_qj).
    hist_idx = torch.zeros(n, 2 * s.max_cycles, dtype=torch.long, device=dev)
    hist_val = torch.zeros(n, 2 * s.max_cycles, dtype=torch.float64, device=dev)
    hist_len = torch.zeros(n, dtype=torch.long, device=dev)

    h_flat = H.double().reshape(-1)  # [K * K]

    def g_at(cols, used):
        """<eps_q, x^_c> now, for every row q and its column cols[q]. [N]"""
        if used == 0:
            return g0.gather(1, cols.unsqueeze(1)).squeeze(1)
        flat = hist_idx[:, :used] * k + cols.unsqueeze(1)  # [N, used] positions of H[idx_h, c]
        h_vals = h_flat.index_select(0, flat.reshape(-1)).view(n, used)
        return g0.gather(1, cols.unsqueeze(1)).squeeze(1) + (hist_val[:, :used] * h_vals).sum(1)

    def take(mat, cols):
        return mat.gather(1, cols.unsqueeze(1)).squeeze(1)  # [N] mat[q, cols[q]]

    gp = torch.zeros(n, dtype=torch.long, device=dev)  # grow pointers
    pp = torch.zeros(n, dtype=torch.long, device=dev)  # prune pointers (unstructured)
    swaps = torch.zeros((), dtype=torch.long, device=dev)
    rejected = torch.zeros((), dtype=torch.long, device=dev)
    # Every row is processed each cycle under masks (no per-cycle nonzero() or .item()): on a GPU
    # the loop then runs without host synchronization; inactive rows change nothing.
    for cycle in range(s.max_cycles):
        if cycle % 8 == 0 and not bool(active.any()):
            break
        info["cycles"] = cycle + 1
        has_grow = active & (gp < n_grow)
        i = take(grow_order, gp.clamp(max=k - 1))  # [N]
        gp += active  # each grow candidate is tried once
        if target.is_nm:  # the prune must stay in i's group of M
            idx = (i // target.m * target.m).unsqueeze(1) + offsets  # [N, M]
            cand = torch.where(Wc.gather(1, idx) != 0, pscore.gather(1, idx), math.inf)
            pbest, jj = cand.min(1)
            j = idx.gather(1, jj.unsqueeze(1)).squeeze(1)
            has_prune = torch.isfinite(pbest)
        else:
            has_prune = pp < n_prune
            j = take(prune_order, pp.clamp(max=k - 1))
        wi, wj = take(W, i), take(Wc, j)  # [N] grown (dense) and pruned (current) values
        e_after = err_mean - wi * mu[i] + wj * mu[j]
        both = has_grow & has_prune
        accept = both & (torch.sign(e_after) == sign0)  # DSnoT: keep the sign of E[eps_q]
        stop = active & (~has_grow | (both & ~accept))
        if not target.is_nm:
            stop |= active & ~has_prune  # no kept weight left that moves the mean error toward 0
        if s.guard:
            gi, gj, hij = g_at(i, 2 * cycle), g_at(j, 2 * cycle), h_flat[i * k + j]
            hii, hjj = h_diag[i], h_diag[j]
            delta = -2 * wi * gi + 2 * wj * gj + wi ** 2 * hii - 2 * wi * wj * hij + wj ** 2 * hjj
            size = 2 * (wi * gi).abs() + 2 * (wj * gj).abs() + wi ** 2 * hii + 2 * (wi * wj * hij).abs() + wj ** 2 * hjj
            ok = delta < -GUARD_MARGIN * size
            rejected += (accept & ~ok).sum()
            accept &= ok  # a rejected pair leaves the row active: its next grow candidate comes next
        Wc.scatter_(1, i.unsqueeze(1), torch.where(accept, wi, take(Wc, i)).unsqueeze(1))
        Wc.scatter_(1, j.unsqueeze(1), torch.where(accept, torch.zeros_like(wj), wj).unsqueeze(1))
        err_mean = torch.where(accept, e_after, err_mean)
        pp += accept
        at = hist_len.unsqueeze(1)  # [N, 1]; at + 1 < 2 * max_cycles: one swap per row and cycle
        hist_idx.scatter_(1, at, torch.where(accept, i, take(hist_idx, hist_len)).unsqueeze(1))
        hist_val.scatter_(1, at, torch.where(accept, -wi, take(hist_val, hist_len)).unsqueeze(1))
        hist_idx.scatter_(1, at + 1, torch.where(accept, j, take(hist_idx, hist_len + 1)).unsqueeze(1))
        hist_val.scatter_(1, at + 1, torch.where(accept, wj, take(hist_val, hist_len + 1)).unsqueeze(1))
        hist_len += 2 * accept
        swaps += accept.sum()
        active &= ~stop & ~(accept & (err_mean.abs() <= s.update_threshold))
    info["swaps"], info["rejected_by_guard"] = int(swaps), int(rejected)
    return Wc.to(pruned.dtype), info
