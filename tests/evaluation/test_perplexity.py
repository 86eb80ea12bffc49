"""Perplexity's per-window NLLs and the paired comparison built on them."""
import math

import pytest
import torch

from duoserve.evaluation.perplexity import paired_nll_difference, perplexity


class Unigram(torch.nn.Module):
    """A model whose next-token logits are a fixed vector: every window's NLL is known in closed form."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, use_cache=False):
        b, t = input_ids.shape
        return type("Out", (), {"logits": self.logits.expand(b, t, -1)})()


def test_window_nll_is_each_windows_mean_and_batches_agree():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    logp = torch.log_softmax(logits, 0)
    windows = torch.tensor([[0, 1, 1, 1], [0, 3, 3, 3], [2, 0, 1, 2]])
    expected = [float(-logp[w[1:]].mean()) for w in windows]
    one = perplexity(Unigram(logits), windows, batch_size=1, desc="t")
    two = perplexity(Unigram(logits), windows, batch_size=2, desc="t")
    assert one["window_nll"] == pytest.approx(expected, rel=1e-6)
    assert two["window_nll"] == pytest.approx(expected, rel=1e-6)
    assert one["mean_nll"] == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert one["ppl"] == pytest.approx(math.exp(sum(expected) / 3), rel=1e-6)
    assert one["tokens"] == 9 and one["windows"] == 3


def test_paired_difference_sees_a_constant_gap_as_certain():
    a = [3.0, 4.0, 5.0, 2.0]
    b = [x - 0.1 for x in a]  # b is 0.1 nats better on every window
    d = paired_nll_difference(a, b)
    assert d["mean"] == pytest.approx(0.1) and d["se"] == pytest.approx(0.0, abs=1e-12)
    assert d["ppl_ratio"] == pytest.approx(math.exp(-0.1))
    lo, hi = d["ppl_ratio_interval"]
    assert lo == pytest.approx(hi) and hi < 1


def test_paired_difference_interval_covers_one_when_windows_disagree():
    d = paired_nll_difference([1.0, 2.0, 1.0, 2.0], [1.5, 1.5, 1.5, 1.5])
    assert d["mean"] == pytest.approx(0.0)
    lo, hi = d["ppl_ratio_interval"]
    assert lo < 1 < hi


def test_paired_difference_refuses_unpaired_input():
    with pytest.raises(ValueError, match="same windows"):
        paired_nll_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="same windows"):
        paired_nll_difference([1.0], [1.0])
