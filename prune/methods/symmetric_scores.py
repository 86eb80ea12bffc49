"""Score formulas of the symmetric-pruning family (Yi & Richtarik, "Symmetric Pruning for LLMs").

Notation. The paper writes W as [inputs b x outputs c]: row j = input channel, column k = output
channel, X [a x b] the calibration inputs, Y [c x d] an "output calibration". duoserve stores a
linear's weight as PyTorch does, [N out, K in], so the paper's W_jk is our weight[k, j]:
- the paper's ||W_j:||  (input j, across outputs) is our *column* norm  `col_norm` [1, K];
- the paper's ||W_:k||  (output k, across inputs) is our *row* norm     `row_norm` [N, 1];
- ||X_:j||_2 (input channel j over the calibration tokens) is our `x_norm` [K];
- ||Y_k:||_2 (output channel k over the calibration tokens) is our `y_norm` [N].
Every function below returns scores of shape [N, K] (higher = keep).

Formulas (the paper's numbering):
- SymWanda, Lemma 3.1:       S = |W_jk| (||X_:j|| + ||Y_k:||)
- squared variant, App. B:   S = |W_jk| sqrt(||X_:j||^2 + ||Y_k:||^2)
- Corollary 3.4 (X = Y = W^T): S = |W_jk| (||W_j:||_2 + ||W_:k||_2)
- Lemma 3.7 (A = X, B = Y):  S = |W_jk| (||X_:j|| / ||W_j:||_1 + ||Y_k:|| / ||W_:k||_1)
- RI, Theorem 3.5:           S = |W_jk| (1 / ||W_j:||_1 + 1 / ||W_:k||_1)
- RIA, eq. (2):              S = RI_jk * ||X_:j||^alpha
- l_p reweighting, App. C.3 with a = ||W_j:||_p, c = ||W_:k||_p:
  S1 = |W| (1/a + 1/c), S2 = |W| / (a + c), S3 = |W| (a + c), S4 = |W| / (1/a + 1/c)
- stochRIA, eq. (4): the l1 sums over random subsets S_j, S_k of tau entries.
"""
from __future__ import annotations

import math

import torch

from duoserve.prune.methods.wanda import InputNormObserver
from duoserve.prune.sparsity import SparsityTarget, select_prune_mask

MASK_SCOPES = ("layer", "row")
RELATIVE_MODES = ("both", "col", "row")
STRATEGIES = ("s1", "s2", "s3", "s4")

# A zero line norm (a fully zero row or column) would make 1/norm infinite; such lines hold only
# zeros, whose score |W| * inf would be NaN. Clamping keeps their scores at 0 (pruned first).
_TINY = 1e-30


def line_norms(weight: torch.Tensor, p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_norm [N, 1] over the inputs of each output, col_norm [1, K] over the outputs of each input)."""
    w = weight.abs().double()
    if math.isinf(p):
        return w.amax(1, keepdim=True), w.amax(0, keepdim=True)
    return w.norm(p=p, dim=1, keepdim=True), w.norm(p=p, dim=0, keepdim=True)


def relative_factor(weight: torch.Tensor, p: float = 1.0, relative: str = "both",
                    strategy: str = "s1") -> torch.Tensor:
    """The weight-only factor multiplying |W| (RI for p = 1, S1, both) as [N, K] float64.

    relative: "both" (RI), "col" (only 1/||column||: the paper's Col-Sum ablation, Table 3) or
    "row" (only 1/||row||: Row-Sum). Columns and rows are those of our [out, in] tensor, as in
    RIA's code (`sum(|W|, dim=0)` is the column sum): Col-Sum normalizes each *input* channel.
    """
    if relative not in RELATIVE_MODES:
        raise ValueError(f"relative must be one of {RELATIVE_MODES}, got {relative!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "s1" and relative != "both":
        raise ValueError("the Col-Sum / Row-Sum ablations are defined for strategy s1 only")
    row, col = line_norms(weight, p)
    row, col = row.clamp_min(_TINY), col.clamp_min(_TINY)
    if relative == "col":
        row = torch.full_like(row, math.inf)  # 1/inf = 0: the row term drops out
    elif relative == "row":
        col = torch.full_like(col, math.inf)
    if strategy == "s1":
        return 1.0 / row + 1.0 / col
    if strategy == "s2":
        return 1.0 / (row + col)
    if strategy == "s3":
        return row + col
    return 1.0 / (1.0 / row + 1.0 / col)


def ria_scores(weight: torch.Tensor, x_norm: torch.Tensor | None, alpha: float, p: float = 1.0,
               relative: str = "both", strategy: str = "s1") -> torch.Tensor:
    """|W| * relative_factor * ||X_:j||^alpha  ([N, K] float64); x_norm None or alpha 0 = no data."""
    scores = weight.abs().double() * relative_factor(weight, p, relative, strategy)
    if x_norm is not None and alpha != 0:
        scores = scores * x_norm.double().pow(alpha).unsqueeze(0)
    return scores


def sampled_line_sums(weight: torch.Tensor, tau: int, dim: int, generator: torch.Generator,
                      return_index: bool = False):
    """l1 sums of |W| over tau entries sampled uniformly without replacement from every line.

    dim = 1: one subset of the K inputs for every output row (the paper's S_k of column k);
    dim = 0: one subset of the N outputs for every input column (the paper's S_j of row j).
    Returns the sums with the reduced dim kept ([N, 1] or [1, K]), plus the index sets if asked.
    """
    w = weight.abs().double()
    if dim == 0:
        w = w.T
    lines, length = w.shape
    tau = max(1, min(int(tau), length))
    # A random permutation per line (argsort of uniform noise); its first tau entries are the subset.
    noise = torch.rand(lines, length, generator=generator, device="cpu").to(w.device)
    index = noise.argsort(dim=1)[:, :tau]  # [lines, tau]
    sums = w.gather(1, index).sum(1, keepdim=True)  # [lines, 1]
    if dim == 0:
        sums = sums.T
    return (sums, index) if return_index else sums


def stochria_scores(weight: torch.Tensor, x_norm: torch.Tensor | None, alpha: float, tau_row: int,
                    tau_col: int, generator: torch.Generator) -> torch.Tensor:
    """|W_jk| (1/||W_{j,S_j}||_1 + 1/||W_{S_k,k}||_1) ||X_:j||^alpha, eq. (4) with activations.

    tau_row: entries sampled in every output row (of its K inputs); tau_col: in every input
    column (of its N outputs). Rows are drawn first, then columns, from one generator.
    """
    row = sampled_line_sums(weight, tau_row, 1, generator).clamp_min(_TINY)  # [N, 1]
    col = sampled_line_sums(weight, tau_col, 0, generator).clamp_min(_TINY)  # [1, K]
    scores = weight.abs().double() * (1.0 / row + 1.0 / col)
    if x_norm is not None and alpha != 0:
        scores = scores * x_norm.double().pow(alpha).unsqueeze(0)
    return scores


def symwanda_scores(weight: torch.Tensor, x_norm: torch.Tensor | None, y_norm: torch.Tensor | None,
                    variant: str = "sum") -> torch.Tensor:
    """SymWanda scores [N, K] float64 for the variants of the paper's Table 1 / Appendix B.

    variant "sum": |W| (||X_:j|| + ||Y_k:||); "squared": |W| sqrt(||X_:j||^2 + ||Y_k:||^2);
    "weight": |W| (||W_j:||_2 + ||W_:k||_2) (needs no data); "relative": Lemma 3.7 with A = X, B = Y.
    x_norm None drops the input term (OWanda), y_norm None the output term (Wanda).
    """
    absw = weight.abs().double()
    xn = x_norm.double().unsqueeze(0) if x_norm is not None else torch.zeros(1, weight.shape[1], dtype=torch.float64,
                                                                             device=weight.device)
    yn = y_norm.double().unsqueeze(1) if y_norm is not None else torch.zeros(weight.shape[0], 1, dtype=torch.float64,
                                                                             device=weight.device)
    if variant == "sum":
        return absw * (xn + yn)
    if variant == "squared":
        return absw * torch.sqrt(xn ** 2 + yn ** 2)
    if variant == "weight":
        row, col = line_norms(weight, 2.0)
        return absw * (col + row)
    if variant == "relative":
        row, col = line_norms(weight, 1.0)
        return absw * (xn / col.clamp_min(_TINY) + yn / row.clamp_min(_TINY))
    raise ValueError(f"unknown SymWanda variant {variant!r}")


def check_scope(scope: str) -> None:
    if scope not in MASK_SCOPES:
        raise ValueError(f"mask_scope must be one of {MASK_SCOPES}, got {scope!r}")


def apply_scores(weight: torch.Tensor, scores: torch.Tensor, target: SparsityTarget, scope: str) -> torch.Tensor:
    """Zero the lowest scores: N:M groups, or the whole layer / each output row for unstructured."""
    mask = select_prune_mask(scores, target, per="all" if scope == "layer" else "row")  # [N, K] True = prune
    return weight.masked_fill(mask, 0.0)


class OutputNormObserver(InputNormObserver):
    """Input norms ||X_:j|| and output norms ||Y_k:|| of one linear on the calibration tokens.

    Output statistics: the observer sees only the linear's inputs x [T, K], but the engine creates
    it with the linear, whose weight stays dense until prune() is called (the engine prunes after
    the last batch). So add_batch computes y = x W^T directly and accumulates sum_t y_tk^2 in [N].
    This costs one extra matmul per batch (what the layer's forward costs) and N floats of state,
    against the K x K matrix X^T X (and a quadratic form per row) that deriving
    ||Y_k||^2 = w_k^T (X^T X) w_k in prune() would need; no change to the observer protocol.
    Y excludes the bias, which pruning never touches.
    """

    def __init__(self, method, linear: torch.nn.Linear, need_input: bool = True, need_output: bool = True):
        super().__init__(method, linear.in_features)
        self.linear = linear
        self.need_input, self.need_output = need_input, need_output
        self.out_sq_norm = torch.zeros(linear.out_features, dtype=torch.float64)  # [N] sum_t y_tk^2

    def add_batch(self, x, x_dense):
        if self.need_input:
            super().add_batch(x, x_dense)
        if not self.need_output:
            return
        w = self.linear.weight
        y = x.to(w.dtype) @ w.T  # [T, N] the dense linear's output on this batch
        self.out_sq_norm += (y.double() ** 2).sum(0).cpu()

    def output_norm(self, device) -> torch.Tensor:
        return self.out_sq_norm.sqrt().to(device=device, dtype=torch.float32)  # [N]
