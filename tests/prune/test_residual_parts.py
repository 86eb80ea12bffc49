"""DuoGPT's residual parts: dX = (activations the linear drops) + (earlier layers' error), each
weighed by --residual-dropped / --residual-upstream (prune/methods/sparsegpt.py ObsObserver)."""
import pytest
import torch
from torch import nn

from duoserve.prune.activation import sparsify_topk
from duoserve.prune.methods.duogpt import DuoGPT, DuoGPTOptions
from duoserve.prune.methods.sparsegpt import SparseGPT
from duoserve.prune.obs import HessianStats
from duoserve.prune.sparsity import SparsityTarget

TARGET = SparsityTarget.parse("0.5")


def _inputs(tokens=1024, k=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_dense = torch.randn(tokens, k, generator=g)
    x = x_dense + 0.3 * torch.randn(tokens, k, generator=g)  # the pruned stream: upstream error
    return x, x_dense


def _pruned(method, linear, x, x_dense):
    obs = method.observer("l", linear)
    for b in range(0, x.shape[0], 256):
        obs.add_batch(x[b:b + 256], None if x_dense is None else x_dense[b:b + 256])
    return obs.prune(linear.weight.data.float())


@pytest.fixture()
def linear():
    torch.manual_seed(1)
    return nn.Linear(32, 8, bias=False)


@pytest.mark.parametrize("dropped, upstream", [(0.5, 1.0), (1.0, 0.5), (0.0, 1.0), (0.25, 0.75)])
def test_the_residual_target_weighs_the_two_parts(linear, dropped, upstream):
    x, x_dense = _inputs()
    observer = DuoGPT(TARGET, 0.5, DuoGPTOptions(residual_dropped=dropped, residual_upstream=upstream)) \
        .observer("l", linear)
    observer.add_batch(x, x_dense)
    x_hat = sparsify_topk(x, 0.5)
    expected = HessianStats(32, True, "cpu")
    expected.add(x_hat, x_hat + dropped * (x - x_hat) + upstream * (x_dense - x))
    torch.testing.assert_close(observer.stats.H, expected.H)
    torch.testing.assert_close(observer.stats.G, expected.G)
    paper = HessianStats(32, True, "cpu")
    paper.add(x_hat, x_dense)
    assert not torch.allclose(observer.stats.G, paper.G)


def test_no_upstream_without_activation_sparsity_is_sparsegpt(linear):
    # with p_x = 0 nothing is dropped, so dX is the upstream part alone
    x, x_dense = _inputs()
    duo = _pruned(DuoGPT(TARGET, 0.0, DuoGPTOptions(residual_upstream=0.0)), linear, x, x_dense)
    sgpt = _pruned(SparseGPT(TARGET, 0.0), linear, x, None)
    torch.testing.assert_close(duo, sgpt)
    assert not torch.allclose(_pruned(DuoGPT(TARGET, 0.0, DuoGPTOptions()), linear, x, x_dense), sgpt)


def test_either_part_alone_still_corrects_and_keeps_exact_sparsity(linear):
    x, x_dense = _inputs()
    sgpt = _pruned(SparseGPT(TARGET, 0.5), linear, x, None)
    for opts in (DuoGPTOptions(residual_upstream=0.0), DuoGPTOptions(residual_dropped=0.0)):
        pruned = _pruned(DuoGPT(TARGET, 0.5, opts), linear, x, x_dense)
        assert int((pruned == 0).sum()) == linear.weight.numel() // 2
        assert not torch.allclose(pruned, sgpt)


@pytest.mark.parametrize("part", ["residual_dropped", "residual_upstream"])
@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_a_share_outside_the_unit_interval_is_refused(part, bad):
    with pytest.raises(ValueError, match=f"{part} must be in"):
        DuoGPTOptions(**{part: bad})
