"""The least-squares scale refit after a joint solve (prune/obs.py, refit_scales; issue 31)."""
import pytest
import torch

from duoserve.format.quant import MIN_SCALE, codes_from_dense, expand_groups
from duoserve.format.schema import WeightQuant
from duoserve.prune.obs import HessianStats, ObsSettings, _GroupScales, _obs_solve, obs_prune, refit_scales
from duoserve.format.quant import group_scales
from duoserve.prune.sparsity import SparsityTarget

from tests.prune.test_quantize import correlated_inputs


def stats_for(x, x_dense=None):
    st = HessianStats(x.shape[1], x_dense is not None, "cpu")
    for i, chunk in enumerate(x.split(512)):
        st.add(chunk, x_dense.split(512)[i] if x_dense is not None else None)
    return st


def objective(w, w0, st, s):
    """||W X^ - W0 (X^ + s dX)||^2 up to a constant (the solve's objective)."""
    E = st.H + (s * st.G.T if st.G is not None else 0)
    return float(((w @ st.H) * w).sum() - 2 * ((w @ E) * w0).sum())


def joint_without_refit(w, st, target, settings, quant):
    floating = obs_prune(w, st, target, settings)
    kept = floating != 0
    scales = group_scales(floating, quant.bits, quant.group_size, kept)
    return _obs_solve(w, st, target, settings, ~kept, _GroupScales(quant, scales, None)), scales


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bits,group,k", [(4, 128, 256), (4, 64, 200), (8, 32, 96)])
def test_refit_keeps_mask_and_codes_and_never_raises_the_objective(residual, bits, group, k):
    torch.manual_seed(0)
    w = torch.randn(40, k)
    x = correlated_inputs(2048, k)
    xd = x + 0.2 * torch.randn_like(x) if residual else None
    st = stats_for(x, xd)
    settings = ObsSettings(damp=0.1, act_order=True, residual_scale=0.5 if residual else 1.0,
                           residual_target="original")
    quant = WeightQuant(bits, group)
    before, old = joint_without_refit(w, st, SparsityTarget.parse("0.5"), settings, quant)
    after, new = refit_scales(before, old, w, st, settings, quant)
    assert new.dtype == torch.float16 and new.shape == old.shape
    assert bool(torch.isfinite(new).all()) and bool((new.float() >= MIN_SCALE).all())
    assert torch.equal(after != 0, before != 0)  # exact sparsity: no level is 0
    codes_before = codes_from_dense(before, old, quant)
    codes_after = codes_from_dense(after.to(torch.bfloat16), new, quant)  # recoverable from bf16 as the writer does
    assert torch.equal(codes_before, codes_after)
    s = settings.residual_scale if residual else 0.0
    floating = obs_prune(w, st, SparsityTarget.parse("0.5"), settings)
    f, b, a = (objective(v, w, st, s) for v in (floating, before, after))
    print("rounding's share after / before the refit:", (a - f) / (b - f))
    assert a < b, (f, b, a)  # (it can even beat the float solve: the group gains are free parameters)


def test_obs_prune_joint_result_is_the_refit_one():
    torch.manual_seed(1)
    w = torch.randn(32, 256)
    x = correlated_inputs(2048, 256, seed=1)
    st = stats_for(x)
    settings, quant, target = ObsSettings(), WeightQuant(4, 128), SparsityTarget.parse("0.5")
    out, scales = obs_prune(w, st, target, settings, quant=quant)
    before, old = joint_without_refit(w, st, target, settings, quant)
    expect, expect_scales = refit_scales(before, old, w, st, settings, quant)
    assert torch.equal(out, expect) and torch.equal(scales, expect_scales)


def test_empty_groups_and_rows_keep_their_scales():
    torch.manual_seed(2)
    k, quant = 96, WeightQuant(4, 32)
    w = torch.randn(6, k)
    x = correlated_inputs(1024, k, seed=2)
    x[:, 32:64] = 0  # inputs that never fire: group 1 is pruned entirely
    st = stats_for(x)
    settings = ObsSettings()
    before, old = joint_without_refit(w, st, SparsityTarget.parse("0.5"), settings, quant)
    before[2] = 0  # a row with nothing kept
    after, new = refit_scales(before, old, w, st, settings, quant)
    assert bool((after[:, 32:64] == 0).all()) and bool((after[2] == 0).all())
    assert torch.equal(new[:, 1], old[:, 1]) and torch.equal(new[2], old[2])
    assert bool(torch.isfinite(after).all())
    full = expand_groups(new.float(), k, quant.group_size)
    levels = after / full
    assert torch.equal(levels, torch.round(2 * levels) / 2)  # every weight a half-integer level
