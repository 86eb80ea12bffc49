"""The blocked Optimal-Brain-Surgeon solver shared by SparseGPT and DuoGPT.

Notation (also in docs/pruning.md): W [N, K] (out, in); calibration inputs X^ [K, m] (the
pruned model's inputs, activation-sparsified when p_x > 0); X~ [K, m] (the dense model's
inputs); H = X^ X^T; H^-1 = L L^T with L lower-triangular (L^T is the upper Cholesky factor of
H^-1 that SparseGPT calls Hinv).

SparseGPT (Frantar & Alistarh 2023): for blocks of B columns, prune the p_w fraction of the block
(all rows x B columns together) with the lowest W^2 / diag(L)^2, then column by column
E_j = (W_j - P_j) / L_jj, W[:, j:] -= E_j L^T[j, j:]; a lazy update carries the block's error to
the later columns.

DuoGPT (Yin et al. 2025, Algorithm 1) adds the asymmetric residual dX = X~ - X^:
Q = dX X^T L, U = strict_upper(Q), a = diag(dX dX^T), b = diag(U U^T), c = diag(Q) / diag(L),
D = U L^T; score S = W^2 (1/diag(L)^2 + a - b + 2c); the updates gain + W_j D[j, j:].

Residual target. Algorithm 1 attributes to column p the residual R_p = W_:,p dX_p of the *running*
weights (the paper's "R <- R - dW dX"): the target moves with every compensation, and the
compensation added to later columns is itself treated as needing compensation for dX. Since
W_q <- W_q + sum_{p<q} W_p D_pq, the recursion is W (I - D)^-1, unbounded when D is large (deep
layers, where dX carries the upstream pruning error as well as activation sparsity): on SmolLM2 at
W60%+X60% it inflated a down_proj's norm 150x. `residual_target="original"` uses the dense weights
W0 instead: R_p = W0_:,p dX_p, the residual of the fixed objective ||W' X^ - W0 X~|| (section 4.2), no
feedback (the updates become W0 D, the score W^2/d^2 + W0^2 (a - b) + 2 W W0 c by the same
derivation). docs/pruning.md has the measurements that chose the default.

Scale: every statistic is a running mean of (2/m) x x^T-type products (SparseGPT's convention),
applied to X^ and dX alike, so H, dX X^T and a share one scale. Scaling them all by s scales
every score term by s and leaves D unchanged, so no extra factor is needed (GPTAQ's code
multiplies its D by 0.25; `residual_scale` is that factor on dX. ObsSettings keeps the paper's
literal defaults (1, running); DuoGPTOptions defaults to the measured best (0.5, original).

Joint quantization (`quant`, issue 31; SparseGPT section 3.5, GPTQ): a kept weight is replaced by
its nearest level of the group's grid (duoserve.format.quant) inside the column loop, so its
rounding error is fed back to the later columns exactly like a pruned weight's (q = quantized w
where kept, 0 where pruned; err = (w - q) / L_jj). The grid must fit the weights as they will be
after compensation, which pruning changes a lot: scales taken from the weights at the start of
each block (GPTQ's rule) left 2.5% of the kept weights of a 50% random layer outside the grid
by the time they were rounded, and the clamping made int8 joint rounding 10x worse than rounding
afterwards. So a joint solve runs twice: the float solve chooses the mask and its kept weights
give the scales (the largest kept |w| per row and group); the second solve, with that mask and
those scales, rounds in the loop. With p_w = 0 it is GPTQ with static groups.

Scale refit (`refit_scales`): the joint solve fixes the codes; each row's group scales are then
re-chosen by least squares on the fixed objective ||W' X^ - W0 (X^ + s dX)||^2 (s the
residual scale; SparseGPT: s = 0), with the full H, not its diagonal: with w = sum_g t_g v_g (v_g
the row's dequantized group g) it is a quadratic in the ceil(K/G) multipliers t, solved per row.
The codes, the mask and the format do not change (a scale is any positive float16). A per-group
clipping search on the float solve's weights (the RTN remedy) bought nothing here: the joint solve
already feeds a group's rounding error forward: on SmolLM2's first three layers (DuoGPT W50+X50,
int4, G 128, calibration tokens) the joint rounding raised the 21 linears' objective by 36.4 in
total over the float solve with the group max, 36.2 with a diag(H)-weighted clipping search, 3.1
after the refit (a second solve with the refit scales and a second refit: 1.8, not worth a third
solve). With fixed codes the refit also acts as a per-group gain on the pruning's compensation, so
it can end below the float solve (docs/pruning.md, "Quantized values").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from duoserve.format.quant import MIN_SCALE, expand_groups, group_scales, half_range
from duoserve.format.schema import WeightQuant
from duoserve.prune.sparsity import SparsityTarget, prune_lowest_overall, prune_nm


RESIDUAL_TARGETS = ("running", "original")
RESIDUAL_FITS = ("obs", "ridge")


def check_residual_target(value: str) -> None:
    if value not in RESIDUAL_TARGETS:
        raise ValueError(f"residual_target must be one of {', '.join(RESIDUAL_TARGETS)}, got {value!r}")


class HessianStats:
    """Running statistics of one linear's calibration inputs (fp32, on the inputs' device).

    H = mean of 2 x^ x^T; with a dense stream also G = mean of 2 dx x^T and a = mean of 2 dx^2
    (per input channel), dx = x~ - x^.
    """

    def __init__(self, in_features: int, with_residual: bool, device, with_gap: bool = False):
        k = in_features
        # F = mean of 2 dx dx^T: only for held-out tokens, to report how much of W0 dX a correction explains.
        self.F = torch.zeros(k, k, dtype=torch.float32, device=device) if with_gap else None
        self.H = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.G = torch.zeros(k, k, dtype=torch.float32, device=device) if with_residual else None
        self.a = torch.zeros(k, dtype=torch.float32, device=device) if with_residual else None
        self.tokens = 0

    def without(self, part: "HessianStats") -> "HessianStats":
        """The statistics of the tokens in self but not in `part` (a subset of them): means -> sums,
        subtract, -> means."""
        rest = HessianStats.__new__(HessianStats)
        rest.tokens = self.tokens - part.tokens
        if rest.tokens <= 0:
            raise ValueError("the held-out part has all the tokens; nothing is left to fit on")

        def mean(total, sub):
            return None if total is None else (total * self.tokens - sub * part.tokens) / rest.tokens

        rest.H, rest.G, rest.a = mean(self.H, part.H), mean(self.G, part.G), mean(self.a, part.a)
        rest.F = None
        return rest

    def first_order(self) -> "HessianStats":
        """The same tokens' H alone (no residual statistics): what SparseGPT's solve reads."""
        plain = HessianStats.__new__(HessianStats)
        plain.H, plain.G, plain.a, plain.F, plain.tokens = self.H, None, None, None, self.tokens
        return plain

    def add(self, x_hat: torch.Tensor, x_dense: torch.Tensor | None = None) -> None:
        """x_hat, x_dense: [T, K] fp32."""
        t = x_hat.shape[0]
        keep = self.tokens / (self.tokens + t)
        self.tokens += t
        scale = (2.0 / self.tokens) ** 0.5
        xs = x_hat.float() * scale  # [T, K]
        self.H.mul_(keep).addmm_(xs.T, xs)
        if self.G is not None:
            if x_dense is None:
                raise ValueError("this statistic needs the dense stream's inputs")
            dxs = x_dense.float() * scale - xs  # [T, K]
            self.G.mul_(keep).addmm_(dxs.T, xs)
            self.a.mul_(keep).add_((dxs ** 2).sum(0))
            if self.F is not None:
                self.F.mul_(keep).addmm_(dxs.T, dxs)


@dataclass(frozen=True)
class ObsSettings:
    blocksize: int = 128
    damp: float = 0.01
    act_order: bool = False
    residual_scale: float = 1.0
    residual_target: str = "running"  # "running" (Algorithm 1 as printed) or "original" (dense W0)
    # "obs": the residual inside the OBS loop (Algorithm 1); "ridge": the residual first, as dense
    # weights (residual_corrected_weights, with its own ridge), then the plain SparseGPT solve.
    residual_fit: str = "obs"
    residual_ridge: float = 0.1  # "ridge": the regression's dampening, as a fraction of mean(diag H)

    def __post_init__(self):
        check_residual_target(self.residual_target)
        if self.residual_fit not in RESIDUAL_FITS:
            raise ValueError(f"residual_fit must be one of {', '.join(RESIDUAL_FITS)}, got {self.residual_fit!r}")
        if not self.residual_ridge > 0:
            raise ValueError(f"residual_ridge must be > 0, got {self.residual_ridge}")


@torch.no_grad()
def residual_corrected_weights(weight: torch.Tensor, stats: "HessianStats", scale: float,
                               ridge: float) -> torch.Tensor:
    """W_c = W0 + s W0 G (H + ridge mean(diag H) I)^-1: the dense weights that best map the pruned
    model's inputs X^ to the target W0 (X^ + s dX), a ridge regression of the residual on X^.

    For any W, ||W X^ - W0 (X^ + s dX)||^2 = ||(W - W_c) X^||^2 + const when the ridge is 0, so
    pruning W_c with SparseGPT's objective minimizes DuoGPT's: the residual's regularization (the
    ridge) and the pruning solve's dampening and column order are then separate settings, and at
    s = 0 the result is exactly SparseGPT's."""
    W0 = weight.float()
    if stats.G is None or scale == 0:
        return W0.clone()
    H = damped(stats.H.float(), ridge)
    M = W0 @ stats.G.float()  # [N, K]: W0 G, G = mean 2 dx x^T
    correction = torch.cholesky_solve(M.T.contiguous(), torch.linalg.cholesky(H)).T  # M H^-1 (H symmetric)
    return W0 + scale * correction


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) I, with inputs that were always zero given a unit diagonal."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    return H


@dataclass(frozen=True)
class ResidualChoice:
    """The held-out choice of the residual strength, and what it buys on the held-out tokens: how
    much lower the pruned weights' held-out objective is than at scale 0, at the chosen scale and
    at the paper's 1 (negative: worse than no residual). None without held-out gap statistics."""
    scale: float
    reduction: float | None = None
    reduction_at_1: float | None = None


@torch.no_grad()
def heldout_pruned_scale(weight: torch.Tensor, fit: HessianStats, heldout: HessianStats, target: SparsityTarget,
                         settings: ObsSettings, reference: float = 0.5,
                         max_rows: int | None = 256) -> tuple[ResidualChoice, torch.Tensor]:
    """The residual strength whose *pruned* weights do best on held-out tokens, in [0, 1].

    Prunes on the fit tokens at the reference scale (which chooses the mask), solves again with
    that mask at scale 0; with a fixed mask the weights are affine in the scale,
    W(s) = W(0) + s (W(ref) - W(0)) / ref, so the held-out objective ||W(s) X^_h - W0 X~_h||^2 is a
    quadratic in s and its minimum has a closed form. Returns the choice (reduction: the held-out
    objective's reduction relative to s = 0) and the mask (of the rows used).

    Rows are solved independently (the mask is chosen per block over all rows, a quantile that a
    random subset of rows estimates), so with max_rows the choice uses a seeded random subset of
    that many output rows: the two extra solves then cost a fraction of the final one.
    """
    W0 = weight.float()
    if max_rows is not None and W0.shape[0] > max_rows:
        rows = torch.randperm(W0.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]
        W0 = W0[rows.sort().values]
    at_ref = obs_prune(W0, fit, target, dataclasses.replace(settings, residual_scale=reference))
    mask = at_ref == 0
    at_zero = obs_prune(W0, fit, target, dataclasses.replace(settings, residual_scale=0.0), mask=mask)
    slope = (at_ref - at_zero) / reference  # dW/ds
    A = at_zero - W0  # Delta(s) = A + s slope
    H, G = heldout.H, heldout.G
    linear = float(((slope @ G.T) * W0).sum()) - float(((A @ H) * slope).sum())
    quad = float(((slope @ H) * slope).sum())
    scale = min(1.0, max(0.0, linear / quad)) if quad > 0 and linear == linear else 0.0
    if heldout.F is None:
        return ResidualChoice(scale), mask
    e0 = float(((A @ H) * A).sum()) - 2 * float(((A @ G.T) * W0).sum()) + float(((W0 @ heldout.F) * W0).sum())

    def reduction(s):  # 1 - E(s) / E(0)
        return (2 * s * linear - s * s * quad) / e0 if e0 > 0 else 0.0

    return ResidualChoice(scale, reduction(scale), reduction(1.0)), mask


def _block_mask(scores: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    return prune_lowest_overall(scores, target.fraction)


class _GroupScales:
    """The fixed per-group scales of joint quantization, in the solve's column order."""

    def __init__(self, quant: WeightQuant, scales: torch.Tensor, perm: torch.Tensor | None):
        self.quant, self.half = quant, half_range(quant.bits)
        order = perm if perm is not None else torch.arange(scales.shape[1] * quant.group_size)
        # [K (or more)] group of each processed column; _obs_solve resets it under act_order
        self.col_group = (order // quant.group_size).to(scales.device)
        self.scales = scales.float()  # [N, ceil(K/G)] (float16 values)

    def quantize(self, w: torch.Tensor, col: int) -> torch.Tensor:
        """Nearest grid level of column `col`'s weights w [N] (0 stays 0: inputs that never fire)."""
        s = self.scales[:, self.col_group[col]]
        top = 2 ** self.quant.bits - 1
        q = (torch.floor(w / s + (self.half + 0.5)).clamp_(0, top) - self.half) * s
        return torch.where(w != 0, q, torch.zeros_like(q))


def ridge_residual_first(weight: torch.Tensor, stats: HessianStats, settings: ObsSettings):
    """With the ridge fit: the residual as dense weights, then SparseGPT's solve on them (H only; still
    affine in the residual scale, as heldout_pruned_scale needs). -> (weight, stats, settings) to solve."""
    if stats.G is not None and settings.residual_fit == "ridge":
        weight = residual_corrected_weights(weight, stats, settings.residual_scale, settings.residual_ridge)
        stats = stats.first_order()
        settings = dataclasses.replace(settings, residual_scale=0.0)
    return weight, stats, settings


@torch.no_grad()
def obs_prune(weight: torch.Tensor, stats: HessianStats, target: SparsityTarget, settings: ObsSettings,
              mask: torch.Tensor | None = None, quant: WeightQuant | None = None):
    """Prune W [N, K] (fp32) with SparseGPT's solver, or DuoGPT's when stats carry a residual.

    mask: [N, K] bool, True = prune: use this mask instead of choosing one (the updates still run).
    With a fixed mask the result is affine in residual_scale (every update is linear in W0 and D,
    and D is linear in the scale), which the held-out choice of the scale relies on.
    quant: quantize the kept weights jointly (module docstring); returns (W, scales fp16
    [N, ceil(K/G)]) then, W holding the dequantized values."""
    weight, stats, settings = ridge_residual_first(weight, stats, settings)
    if quant is not None:
        floating = obs_prune(weight, stats, target, settings, mask=mask)  # chooses the mask, sizes the grid
        kept = floating != 0
        scales = group_scales(floating, quant.bits, quant.group_size, kept)  # [N, ceil(K/G)] fp16
        rounded = _obs_solve(weight, stats, target, settings, mask if mask is not None else ~kept,
                             _GroupScales(quant, scales, None))
        return refit_scales(rounded, scales, weight, stats, settings, quant)
    return _obs_solve(weight, stats, target, settings, mask, None)


@torch.no_grad()
def refit_scales(W: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor, stats: HessianStats,
                 settings: ObsSettings, quant: WeightQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares group scales for the fixed codes of a joint solve's result W [N, K] (module
    docstring): per row, minimise t^T A t - 2 t^T b over the multipliers t of its group scales,
    A[g, h] = v_g H v_h^T, b[g] = v_g E w0^T, E = H + s G^T (the objective's cross term). A row keeps
    its old scales where the refit (after rounding to float16) would not lower its objective or
    gives a multiplier that is not finite and positive. -> (W with the new scales, scales fp16)."""
    n, k = W.shape
    gs = quant.group_size
    ng = scales.shape[1]
    W = W.float()
    H = stats.H.float()
    E = H.clone()
    if stats.G is not None and settings.residual_scale:
        E += settings.residual_scale * stats.G.float().T
    target = weight.float() @ E.T  # [N, K]: row r is (E w0_r^T)^T
    pad = ng * gs - k
    Wp = torch.nn.functional.pad(W, (0, pad))  # [N, ng * G]
    b = (Wp * torch.nn.functional.pad(target, (0, pad))).view(n, ng, gs).sum(-1)  # [N, ng]
    A = torch.empty(n, ng, ng, dtype=torch.float32, device=W.device)
    for h in range(ng):
        c0, c1 = h * gs, min((h + 1) * gs, k)
        Y = W[:, c0:c1] @ H[c0:c1, :]  # [N, K]: sum over group h's columns of w_l H_l,:
        A[:, :, h] = (Wp * torch.nn.functional.pad(Y, (0, pad))).view(n, ng, gs).sum(-1)
    A = 0.5 * (A + A.transpose(1, 2))
    ridge = 1e-6 * A.diagonal(dim1=1, dim2=2).abs().mean(-1, keepdim=True) + 1e-30  # [N, 1]
    empty = A.diagonal(dim1=1, dim2=2) <= 0  # groups with nothing kept (or inputs that never fire)
    A.diagonal(dim1=1, dim2=2).add_(ridge + empty.float())
    t = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)  # [N, ng]
    old = scales.float()
    new = (old * t).to(torch.float16)
    bad = ~torch.isfinite(new) | ~torch.isfinite(t) | (t <= 0) | empty
    new = torch.where(bad, scales.to(torch.float16), new.clamp_min(MIN_SCALE))
    t16 = new.float() / old  # the multipliers that ship

    def objective(m):  # [N]: t^T A t - 2 t^T b per row
        return (m.unsqueeze(1) @ A @ m.unsqueeze(-1)).reshape(n) - 2 * (m * b).sum(-1)

    better = objective(t16) < objective(torch.ones_like(t16))
    new = torch.where(better.unsqueeze(1), new, scales.to(torch.float16))
    # the codes' levels (0 where pruned): exact, as the solve stores each kept weight as level * scale,
    # a product that fp32 holds exactly (a level has at most 8 significant bits, an fp16 scale 11),
    # and it holds for any table of levels, not only the format's half-integers
    levels = W / expand_groups(old, k, gs)
    return levels * expand_groups(new.float(), k, gs), new


def _obs_solve(weight: torch.Tensor, stats: HessianStats, target: SparsityTarget, settings: ObsSettings,
               mask: torch.Tensor | None, groups: "_GroupScales | None") -> torch.Tensor:
    W = weight.clone().float()  # [N, K]
    n, k = W.shape
    H = stats.H.clone()
    G = stats.G.clone() * settings.residual_scale if stats.G is not None else None
    a = stats.a.clone() * settings.residual_scale ** 2 if stats.a is not None else None

    dead = torch.diag(H) == 0  # inputs that were always zero: no information, prune them
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if G is not None:
        G[:, dead] = 0.0
        G[dead, :] = 0.0
        a[dead] = 0.0

    perm = None
    if settings.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        if mask is not None:
            mask = mask[:, perm]
        if G is not None:
            G, a = G[perm][:, perm], a[perm]

    H.diagonal().add_(settings.damp * torch.mean(torch.diag(H)))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    Lt = torch.linalg.cholesky(Hinv, upper=True)  # [K, K] upper = L^T, H^-1 = L L^T
    del H, Hinv
    diag_l = torch.diag(Lt)  # [K]
    inv_d2 = 1.0 / diag_l ** 2  # SparseGPT's 1 / [H^-1]_pp in the sequential (Cholesky) form
    if G is not None:
        Q = G @ Lt.T  # [K, K] dX X^T L
        U = torch.triu(Q, diagonal=1)
        b = (U ** 2).sum(1)  # diag(U U^T)
        c = torch.diag(Q) / diag_l
        D = U @ Lt  # [K, K] U L^T, strictly upper
        del Q, U, G
    else:
        D = None
    # W0: the dense weights the "original" residual target attributes the residual to.
    W0 = W.clone() if D is not None and settings.residual_target == "original" else None

    def block_scores(W1: torch.Tensor, cols: slice) -> torch.Tensor:
        """Algorithm 1's pruning score of the block's weights W1 [N, B] (columns `cols` of W)."""
        if D is None:
            return W1 ** 2 * inv_d2[cols]
        if W0 is None:  # R_p = W_p dX_p with the running weights: W^2 factors out
            return W1 ** 2 * (inv_d2[cols] + a[cols] - b[cols] + 2.0 * c[cols])
        w0 = W0[:, cols]
        return W1 ** 2 * inv_d2[cols] + w0 ** 2 * (a[cols] - b[cols]) + 2.0 * W1 * w0 * c[cols]

    if groups is not None and perm is not None:
        groups.col_group = perm.to(groups.scales.device) // groups.quant.group_size
    B = settings.blocksize
    for i1 in range(0, k, B):
        i2 = min(i1 + B, k)
        W1 = W[:, i1:i2].clone()  # [N, B] current weights of the block
        P1 = torch.zeros_like(W1)  # pruned values
        E1 = torch.zeros_like(W1)  # scaled errors
        # The weights the residual is attributed to: W0's block, or the running columns before
        # pruning (filled in as the columns are processed).
        Wres = None
        if D is not None:
            Wres = W0[:, i1:i2] if W0 is not None else torch.zeros_like(W1)
        Lt1 = Lt[i1:i2, i1:i2]
        D1 = D[i1:i2, i1:i2] if D is not None else None
        mask1 = mask[:, i1:i2] if mask is not None else None
        if mask1 is None and not target.is_nm:
            mask1 = _block_mask(block_scores(W1, slice(i1, i2)), target)  # [N, B] True = prune
        for i in range(i2 - i1):
            w = W1[:, i]
            if mask is None and target.is_nm and i % target.m == 0:
                group = block_scores(W1[:, i:i + target.m], slice(i1 + i, i1 + i + target.m))
                if mask1 is None:
                    mask1 = torch.zeros_like(W1, dtype=torch.bool)
                mask1[:, i:i + target.m] = prune_nm(group, target.n, target.m)
            p = (groups.quantize(w, i1 + i) if groups is not None else w).masked_fill(mask1[:, i], 0.0)
            err = (w - p) / Lt1[i, i]
            update = err.unsqueeze(1) * Lt1[i, i:].unsqueeze(0)  # [N, B - i]
            if D1 is not None:
                if W0 is None:
                    Wres[:, i] = w
                update -= Wres[:, i].unsqueeze(1) * D1[i, i:].unsqueeze(0)
            W1[:, i:] -= update
            P1[:, i] = p
            E1[:, i] = err
        W[:, i1:i2] = P1
        if i2 < k:
            lazy = E1 @ Lt[i1:i2, i2:]  # [N, K - i2]
            if D is not None:
                lazy -= Wres @ D[i1:i2, i2:]
            W[:, i2:] -= lazy
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    return W
