"""Symmetric-pruning scores against the paper's formulas, written in the paper's own notation.

The paper (Yi & Richtarik) writes W as [inputs b x outputs c], X [a x b] (tokens x inputs) and
Y [c x d] (outputs x tokens). `Wp = W.T` below is the paper's W; every direct computation loops
over the paper's indices j (input) and k (output) and is compared with our [out, in] scores.
"""
import math

import pytest
import torch

from duoserve.prune.methods.symmetric_scores import (ria_scores, sampled_line_sums, stochria_scores,
                                                     symwanda_scores)
from duoserve.prune.methods.stochria import sample_sizes
from duoserve.prune.registry import build_options, get_method
from duoserve.prune.sparsity import SparsityTarget, prune_lowest_overall

P_VALUES = [1.0, 2.0, 3.0, 4.0, math.inf]


def data(n=7, k=12, t=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = torch.randn(t, k, generator=g, dtype=torch.float64) * (1 + 3 * torch.rand(k, generator=g, dtype=torch.float64))
    return w, x


def lp(v, p):
    return v.abs().max() if math.isinf(p) else v.abs().pow(p).sum().pow(1 / p)


def paper_scores(w, fn):
    """S [N, K] (our layout) from fn(Wp, j, k), the paper's S_jk."""
    wp = w.T  # [b = K, c = N]
    s = torch.zeros_like(w)
    for j in range(wp.shape[0]):
        for k in range(wp.shape[1]):
            s[k, j] = fn(wp, j, k)
    return s


def run_method(name, w, x, target="0.5", **opts):
    cls = get_method(name)
    method = cls(SparsityTarget.parse(target), 0.0, build_options(cls, opts))
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data = w.float().clone()
    obs = method.observer("mlp.up_proj", linear)
    for chunk in x.float().split(16):
        obs.add_batch(chunk, None)
    return obs.prune(w.float().clone())


def layer_mask_from(scores, w, fraction=0.5):
    return w.float().masked_fill(prune_lowest_overall(scores, fraction), 0.0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("relative", ["both", "col", "row"])
def test_ria_and_ablations_match_the_paper(alpha, relative):
    w, x = data()
    xn = x.norm(dim=0)

    def ria(wp, j, k):
        terms = {"both": 1 / wp[j, :].abs().sum() + 1 / wp[:, k].abs().sum(),
                 # Col-Sum normalizes each input channel (a column of our [out, in] tensor, the
                 # paper's row W_j:), Row-Sum each output (our row, the paper's column W_:k).
                 "col": 1 / wp[j, :].abs().sum(), "row": 1 / wp[:, k].abs().sum()}[relative]
        return wp[j, k].abs() * terms * x[:, j].norm() ** alpha

    expected = paper_scores(w, ria)
    torch.testing.assert_close(ria_scores(w, xn, alpha, relative=relative), expected)
    out = run_method("ria", w, x, alpha=alpha, relative=relative)
    assert torch.equal(out, layer_mask_from(expected, w))


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("strategy", ["s1", "s2", "s3", "s4"])
def test_lp_reweighting_strategies_match_appendix_c3(p, strategy):
    w, x = data(seed=1)
    alpha = 0.5

    def score(wp, j, k):
        a, c = lp(wp[j, :], p), lp(wp[:, k], p)
        factor = {"s1": 1 / a + 1 / c, "s2": 1 / (a + c), "s3": a + c, "s4": 1 / (1 / a + 1 / c)}[strategy]
        return wp[j, k].abs() * factor * x[:, j].norm() ** alpha

    expected = paper_scores(w, score)
    torch.testing.assert_close(ria_scores(w, x.norm(dim=0), alpha, p=p, strategy=strategy), expected)
    out = run_method("lpnorm", w, x, norm_p=p, strategy=strategy, alpha=alpha)
    assert torch.equal(out, layer_mask_from(expected, w))


def test_lpnorm_p1_s1_is_ria():
    w, x = data(seed=2)
    assert torch.equal(run_method("lpnorm", w, x, norm_p=1.0, strategy="s1"), run_method("ria", w, x))


def test_theorem_3_5_constructions_recover_ri():
    """Both constructions of Theorem 3.5 put into the SymWanda score (Lemma 3.1) give RI."""
    w, _ = data(seed=3)
    wp = w.T
    b, c = wp.shape
    row_l1, col_l1 = wp.abs().sum(1), wp.abs().sum(0)  # ||W_j:||_1 [b], ||W_:k||_1 [c]
    ri = ria_scores(w, None, 0.0)
    # v1: X_:j = t_j (1, ..., 1) in R^b, Y_k: = s_k (1, ..., 1) in R^c
    X1 = torch.ones(b, b, dtype=torch.float64) / (b ** 0.5 * row_l1).unsqueeze(0)  # column j = t_j * 1
    Y1 = torch.ones(c, c, dtype=torch.float64) / (c ** 0.5 * col_l1).unsqueeze(1)  # row k = s_k * 1
    # v2: diagonal matrices
    X2, Y2 = torch.diag(1 / row_l1), torch.diag(1 / col_l1)
    for X, Y in [(X1, Y1), (X2, Y2)]:
        torch.testing.assert_close(symwanda_scores(w, X.norm(dim=0), Y.norm(dim=1), "sum"), ri)


def test_lemma_3_6_construction_recovers_ria():
    """A_{j,p} = ||C_:j||^alpha / ||W_j:||_1, B_{s,k} = ||C_:j||^alpha / ||W_:k||_1 (one pair at a time)."""
    w, x = data(seed=4)
    alpha = 0.5
    wp = w.T
    b, c = wp.shape
    expected = ria_scores(w, x.norm(dim=0), alpha)
    for j in range(b):
        for k in range(c):
            cj = x[:, j].norm() ** alpha
            A = torch.zeros(5, b, dtype=torch.float64)
            A[2, j] = cj / wp[j, :].abs().sum()
            B = torch.zeros(c, 5, dtype=torch.float64)
            B[k, 3] = cj / wp[:, k].abs().sum()
            sym = wp[j, k].abs() * (A[:, j].norm() + B[k, :].norm())  # Lemma 3.1 with X = A, Y = B
            torch.testing.assert_close(sym, expected[k, j])


@pytest.mark.parametrize("p", P_VALUES)
def test_lemma_3_8_construction_recovers_lp_norm(p):
    w, _ = data(seed=5)
    wp = w.T
    X = torch.stack([wp[j, :] / (lp(wp[j, :], p) * wp[j, :].norm()) for j in range(wp.shape[0])], dim=1)  # [c, b]
    Y = torch.stack([wp[:, k] / (lp(wp[:, k], p) * wp[:, k].norm()) for k in range(wp.shape[1])], dim=0)  # [c, b]
    torch.testing.assert_close(symwanda_scores(w, X.norm(dim=0), Y.norm(dim=1), "sum"), ria_scores(w, None, 0.0, p=p))


def test_stochria_matches_eq4_and_lemma_3_10():
    w, x = data(n=9, k=14, seed=6)
    alpha, tau_row, tau_col = 0.5, 4, 3
    gen = torch.Generator().manual_seed(11)
    row_sums, row_idx = sampled_line_sums(w, tau_row, 1, gen, return_index=True)  # S_k per output row
    col_sums, col_idx = sampled_line_sums(w, tau_col, 0, gen, return_index=True)  # S_j per input column
    assert row_idx.shape == (9, tau_row) and col_idx.shape == (14, tau_col)
    assert all(len(set(r.tolist())) == tau_row for r in row_idx)  # without replacement
    wp = w.T

    def score(wp, j, k):
        s_j, s_k = col_idx[j], row_idx[k]
        return wp[j, k].abs() * (1 / wp[j, s_j].abs().sum() + 1 / wp[s_k, k].abs().sum()) * x[:, j].norm() ** alpha

    expected = paper_scores(w, score)
    got = stochria_scores(w, x.norm(dim=0), alpha, tau_row, tau_col, torch.Generator().manual_seed(11))
    torch.testing.assert_close(got, expected)
    # Lemma 3.10: X_:j(i) = 1{i in S_j} / (||W_{j,S_j}||_1 sqrt(tau)) has ||X_:j|| = 1 / ||W_{j,S_j}||_1.
    X = torch.zeros(wp.shape[1], wp.shape[0], dtype=torch.float64)
    for j in range(wp.shape[0]):
        X[col_idx[j], j] = 1 / (wp[j, col_idx[j]].abs().sum() * tau_col ** 0.5)
    Y = torch.zeros(wp.shape[1], wp.shape[0], dtype=torch.float64)
    for k in range(wp.shape[1]):
        Y[k, row_idx[k]] = 1 / (wp[row_idx[k], k].abs().sum() * tau_row ** 0.5)
    no_act = stochria_scores(w, None, 0.0, tau_row, tau_col, torch.Generator().manual_seed(11))
    torch.testing.assert_close(symwanda_scores(w, X.norm(dim=0), Y.norm(dim=1), "sum"), no_act)


def test_stochria_beta_one_equals_ria():
    w, x = data(n=10, k=24, seed=7)
    assert torch.equal(run_method("stochria", w, x, beta=1.0, sample_base="line"), run_method("ria", w, x))
    sq, xs = data(n=16, k=16, seed=8)  # with the paper's tau = beta * min(b, c), square matrices only
    assert torch.equal(run_method("stochria", sq, xs, beta=1.0), run_method("ria", sq, xs))
    assert sample_sizes(10, 24, 1.0, "min") == (10, 10)  # non-square: a subset of each long line


def test_stochria_seeding():
    w, x = data(n=32, k=64, seed=9)
    a = run_method("stochria", w, x, beta=0.1, sample_seed=0)
    assert torch.equal(a, run_method("stochria", w, x, beta=0.1, sample_seed=0))
    assert not torch.equal(a, run_method("stochria", w, x, beta=0.1, sample_seed=1))


@pytest.mark.parametrize("variant", ["sum", "squared", "weight", "relative"])
def test_symwanda_variants_match_the_paper(variant):
    w, x = data(seed=10)
    y = (x @ w.T).T  # the paper's Y [c x d]: output channels x tokens, Y = (X W)^T with its W = our w.T

    def score(wp, j, k):
        xj, yk = x[:, j].norm(), y[k, :].norm()
        return wp[j, k].abs() * {
            "sum": xj + yk, "squared": (xj ** 2 + yk ** 2).sqrt(),
            "weight": wp[j, :].norm() + wp[:, k].norm(),  # Corollary 3.4: X = Y = W^T
            "relative": xj / wp[j, :].abs().sum() + yk / wp[:, k].abs().sum()}[variant]  # Lemma 3.7

    expected = paper_scores(w, score)
    out = run_method("symwanda", w, x, variant=variant)
    assert torch.equal(out, layer_mask_from(expected, w))


def test_owanda_is_output_side_wanda_and_degenerates_per_row():
    w, x = data(seed=11)
    y = (x @ w.T).T
    expected = paper_scores(w, lambda wp, j, k: wp[j, k].abs() * y[k, :].norm())
    assert torch.equal(run_method("owanda", w, x), layer_mask_from(expected, w))
    # ||Y_k|| is constant in an output row: per-row and N:M selections are magnitude pruning.
    assert torch.equal(run_method("owanda", w, x, mask_scope="row"), run_method("magnitude", w, x))
    w4, x4 = data(k=16, seed=12)
    assert torch.equal(run_method("owanda", w4, x4, "2:4"), run_method("magnitude", w4, x4, "2:4"))


@pytest.mark.parametrize("method,opts", [("ria", {}), ("ria", {"mask_scope": "row"}), ("stochria", {}),
                                         ("lpnorm", {"norm_p": math.inf}), ("owanda", {}), ("symwanda", {}),
                                         ("symwanda", {"variant": "relative", "mask_scope": "row"})])
@pytest.mark.parametrize("target", ["0.5", "0.6", "2:4", "4:8"])
def test_exact_sparsity(method, opts, target):
    w, x = data(n=33, k=64, t=64, seed=13)
    out = run_method(method, w, x, target, **opts)
    t = SparsityTarget.parse(target)
    if t.is_nm:
        assert ((out != 0).view(33, 64 // t.m, t.m).sum(-1) <= t.n).all()
        assert int((out == 0).sum()) == 33 * 64 * (t.m - t.n) // t.m
    else:
        if opts.get("mask_scope") == "row":  # floor(p K) in every row
            assert ((out == 0).sum(1) == int(64 * t.fraction)).all()
        else:  # floor(p N K) over the layer
            assert int((out == 0).sum()) == int(33 * 64 * t.fraction)


def test_option_validation():
    from duoserve.errors import InputError

    for name, opts, message in [("ria", {"relative": "cols"}, "relative"), ("ria", {"mask_scope": "all"}, "mask_scope"),
                                ("stochria", {"beta": 0.0}, "beta"), ("lpnorm", {"strategy": "s5"}, "strategy"),
                                ("lpnorm", {"norm_p": -1.0}, "norm_p"), ("symwanda", {"variant": "x"}, "variant")]:
        with pytest.raises(InputError, match=message):
            build_options(get_method(name), opts)
