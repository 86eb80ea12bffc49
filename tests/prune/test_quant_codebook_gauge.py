"""scripts/quant_codebook_gauge.py: its uniform mode is `--quantize int4`'s joint solve, and its Lloyd
levels fit the values they are fitted to (so the codebook result in the int4 quality report compares
like with like)."""
import pytest
import torch

from duoserve.prune.obs import HessianStats, ObsSettings, obs_prune
from duoserve.prune.sparsity import SparsityTarget
from script_module import load_script

gauge = load_script("quant_codebook_gauge")


def layer_stats(residual: bool) -> HessianStats:
    torch.manual_seed(0)
    x = torch.randn(2048, 256) @ torch.randn(256, 256) * 0.1
    dense = x + 0.1 * torch.randn_like(x)
    stats = HessianStats(256, residual, "cpu")
    for a, b in zip(x.split(512), dense.split(512)):
        stats.add(a, b if residual else None)
    return stats


@pytest.mark.parametrize("residual", [False, True])
def test_uniform_mode_is_the_joint_int4_solve_bit_for_bit(residual):
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    settings = (ObsSettings(residual_scale=0.25, residual_fit="ridge", damp=0.01, act_order=False) if residual
                else ObsSettings(act_order=False))
    target = SparsityTarget.parse("0.5")
    stats = layer_stats(residual)
    expected, _ = obs_prune(w, stats, target, settings, quant=gauge.QUANT)
    assert torch.equal(gauge.make_joint_solve("uniform", obs_prune)(w, stats, target, settings), expected)
    for mode in ("lloyd", "asymmetric"):
        other = gauge.make_joint_solve(mode, obs_prune)(w, stats, target, settings)
        assert torch.equal(other == 0, expected == 0), mode  # same mask, exact sparsity


def test_asymmetric_grid_spans_each_groups_kept_weights():
    torch.manual_seed(3)
    w = torch.randn(8, 256) + 0.5
    kept = torch.rand(8, 256) > 0.5
    scales, lows = gauge.asymmetric_grid(w * kept, kept)
    row0 = w[0, :128][kept[0, :128]]  # row 0's first group
    assert float(lows[0, 0]) == pytest.approx(float(row0.min()), abs=1e-3)
    assert float(lows[0, 0] + 15 * scales[0, 0].float()) == pytest.approx(float(row0.max()), abs=1e-2)


def test_lloyd_levels_beat_the_uniform_grid_on_a_bimodal_set():
    torch.manual_seed(2)
    u = torch.randn(20000) * 2.5
    u = u[u.abs() > 1.5].clamp(-7.5, 7.5)  # what magnitude pruning leaves: nothing near 0
    weight = torch.ones_like(u)

    def error(levels):
        nearest = levels[torch.bucketize(u, (levels[1:] + levels[:-1]) / 2)]
        return float(((u - nearest) ** 2).mean())

    fitted = gauge.lloyd_levels(u, weight)
    assert torch.all(fitted[1:] > fitted[:-1])
    assert error(fitted) < 0.8 * error(gauge.UNIFORM)
