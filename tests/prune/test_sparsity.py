"""Masks have exactly the requested sparsity: per row, per block, N:M."""
import pytest
import torch

from duoserve.errors import InputError
from duoserve.prune.sparsity import SparsityTarget, prune_lowest_overall, prune_lowest_per_row, prune_nm


@pytest.mark.parametrize("text,fraction,nm", [("0.5", 0.5, None), ("0", 0.0, None), ("2:4", 0.5, (2, 4)),
                                              ("4:8", 0.5, (4, 8)), ("1:4", 0.75, (1, 4)), (" 2 : 4 ", 0.5, (2, 4))])
def test_parse(text, fraction, nm):
    t = SparsityTarget.parse(text)
    assert t.fraction == pytest.approx(fraction)
    assert (t.n, t.m) == (nm or (0, 0))


@pytest.mark.parametrize("bad", ["1.0", "-0.1", "1.5", "nan", "abc", "4:2", "0:4", "2:2", "2:4:8", ""])
def test_parse_rejects(bad):
    with pytest.raises(InputError):
        SparsityTarget.parse(bad)


@pytest.mark.parametrize("shape,p", [((7, 33), 0.5), ((1, 971), 0.3), ((16, 128), 0.9), ((5, 10), 0.0)])
def test_per_row_exact(shape, p):
    scores = torch.randn(shape)
    mask = prune_lowest_per_row(scores, p)
    assert (mask.sum(1) == int(shape[1] * p)).all()
    # the pruned entries are the lowest of their row
    for r in range(shape[0]):
        if mask[r].any() and (~mask[r]).any():
            assert scores[r][mask[r]].max() <= scores[r][~mask[r]].min()


def test_per_row_ties_still_exact():
    scores = torch.zeros(4, 10)  # all tied
    assert (prune_lowest_per_row(scores, 0.5).sum(1) == 5).all()


@pytest.mark.parametrize("p", [0.25, 0.5, 0.7])
def test_overall_exact(p):
    scores = torch.randn(13, 128)
    assert int(prune_lowest_overall(scores, p).sum()) == int(13 * 128 * p)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_exact(n, m):
    scores = torch.randn(9, 64)
    mask = prune_nm(scores, n, m)
    groups = mask.view(9, 64 // m, m)
    assert (groups.sum(-1) == m - n).all()
