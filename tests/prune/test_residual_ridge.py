"""DuoGPT's ridge residual fit (prune/obs.py residual_corrected_weights, --residual-fit ridge)."""
import dataclasses

import pytest
import torch

from duoserve.prune.activation import sparsify_topk
from duoserve.prune.obs import HessianStats, ObsSettings, obs_prune, residual_corrected_weights
from duoserve.prune.sparsity import SparsityTarget


def _streams(tokens=4096, k=48, seed=3):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    x_dense = torch.randn(tokens, k, generator=g) @ mix + 0.1 * torch.randn(tokens, k, generator=g)
    x_hat = sparsify_topk(x_dense + 0.2 * torch.randn(tokens, k, generator=g), 0.5)  # upstream error + sparsity
    stats = HessianStats(k, True, "cpu")
    stats.add(x_hat, x_dense)
    return x_hat.double(), x_dense.double(), stats


def objective(W, W0, x_hat, x_dense, s):
    target = (x_hat + s * (x_dense - x_hat)) @ W0.T
    return float(((x_hat @ W.T - target) ** 2).sum())


def test_corrected_weights_minimize_the_residual_objective():
    x_hat, x_dense, stats = _streams()
    W0 = torch.randn(6, x_hat.shape[1], generator=torch.Generator().manual_seed(1))
    for s in (0.25, 1.0):
        Wc = residual_corrected_weights(W0, stats, s, ridge=1e-6).double()
        best = objective(Wc, W0.double(), x_hat, x_dense, s)
        assert best < objective(W0.double(), W0.double(), x_hat, x_dense, s)
        for _ in range(3):  # any nearby weights do worse: W_c is the least-squares solution
            nudge = 1e-2 * torch.randn_like(Wc)
            assert objective(Wc + nudge, W0.double(), x_hat, x_dense, s) > best


def test_the_ridge_shrinks_the_correction_and_scale_zero_is_the_dense_weights():
    _, _, stats = _streams()
    W0 = torch.randn(6, 48, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(residual_corrected_weights(W0, stats, 0.0, 0.1), W0)
    small = (residual_corrected_weights(W0, stats, 0.5, 1e-4) - W0).norm()
    large = (residual_corrected_weights(W0, stats, 0.5, 1.0) - W0).norm()
    assert 0 < large < small


def test_ridge_fit_at_scale_zero_is_sparsegpt_and_keeps_exact_sparsity():
    _, _, stats = _streams()
    W0 = torch.randn(16, 48, generator=torch.Generator().manual_seed(4))
    target = SparsityTarget.parse("0.5")
    plain = HessianStats(48, False, "cpu")
    plain.H, plain.tokens = stats.H.clone(), stats.tokens
    sparsegpt = obs_prune(W0, plain, target, ObsSettings(16, 0.01, False))
    ridge0 = obs_prune(W0, stats, target, ObsSettings(16, 0.01, False, 0.0, "original", "ridge", 0.1))
    torch.testing.assert_close(ridge0, sparsegpt)
    ridge = obs_prune(W0, stats, target, ObsSettings(16, 0.01, False, 0.5, "original", "ridge", 0.1))
    assert int((ridge == 0).sum()) == W0.numel() // 2
    assert not torch.allclose(ridge, sparsegpt)


def test_ridge_fit_is_affine_in_the_scale_with_a_fixed_mask():
    """heldout_pruned_scale relies on it for either fit."""
    _, _, stats = _streams()
    W0 = torch.randn(8, 48, generator=torch.Generator().manual_seed(5))
    base = ObsSettings(16, 0.01, False, 0.5, "original", "ridge", 0.1)
    mask = obs_prune(W0, stats, SparsityTarget(0.5), base) == 0
    at = {s: obs_prune(W0, stats, SparsityTarget(0.5), dataclasses.replace(base, residual_scale=s), mask=mask)
          for s in (0.0, 0.5, 1.0)}
    torch.testing.assert_close(at[0.5], (at[0.0] + at[1.0]) / 2, rtol=1e-4, atol=1e-5)


def test_settings_and_options_validate():
    from duoserve.prune.methods.duogpt import DuoGPTOptions

    with pytest.raises(ValueError, match="residual_fit"):
        ObsSettings(residual_fit="closed")
    with pytest.raises(ValueError, match="residual_ridge"):
        DuoGPTOptions(residual_fit="ridge", residual_ridge=0.0)
    assert DuoGPTOptions(residual_fit="ridge").damp == 0.01
    assert DuoGPTOptions().damp == 0.01  # the default fit is ridge
    assert DuoGPTOptions(residual_fit="obs").damp == 0.1
    assert DuoGPTOptions(residual_fit="ridge", damp=0.05).damp == 0.05
