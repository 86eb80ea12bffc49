"""Format 2's threshold grid and the serve-time p_x selection (duoserve.format.thresholds).

Pure metadata: no model, no torch in the code under test. The rules: p_x 0 -> thresholds 0; the
calibrated p_x -> act_threshold; a grid point -> its stored thresholds; between two grid points ->
linear interpolation rounded to float32; anything else -> InputError (exit code 2) saying what the
checkpoint offers.
"""
import math
import struct
from dataclasses import replace

import pytest

from duoserve.errors import CheckpointError, InputError
from duoserve.format import ActivationSparsity, ModuleInfo, QuantizationConfig
from duoserve.format.schema import DEFAULT_PX_GRID, px_grid
from duoserve.format.thresholds import select_thresholds

GRID = (0.0, 0.25, 0.5, 0.75)
# float32 values, as a calibration writes them
A_GRID = (0.0, 0.25, 0.5, 1.0)
B_GRID = (0.0, 0.125, 0.375, 0.375)


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def qconfig(version=2, grid=GRID, target=0.5, rule="threshold", a_grid=A_GRID, b_grid=B_GRID):
    modules = {"a": ModuleInfo((4, 8), 16, a_grid[grid.index(target)] if grid else 0.5, a_grid if grid else None),
               "b": ModuleInfo((4, 8), 16, b_grid[grid.index(target)] if grid else 0.3, b_grid if grid else None)}
    return QuantizationConfig(weight_format="bitmask", dtype="bfloat16", modules=modules, format_version=version,
                              activation_sparsity=ActivationSparsity(rule=rule, target=target, grid=grid))


def test_default_grid_is_0_to_0_9_and_always_holds_the_target():
    assert DEFAULT_PX_GRID[0] == 0.0 and DEFAULT_PX_GRID[-1] == 0.9 and len(DEFAULT_PX_GRID) == 19
    assert 0.15 in DEFAULT_PX_GRID  # exact decimals, so a typed 0.15 is a grid point
    assert px_grid(0.33) == tuple(sorted(DEFAULT_PX_GRID + (0.33,)))
    assert px_grid(0.95)[-1] == 0.95 and px_grid(0.5) == DEFAULT_PX_GRID


def test_v2_roundtrip_keeps_the_grid_and_v1_files_stay_unchanged():
    q = qconfig()
    d = q.to_dict()
    assert d["format_version"] == 2 and d["activation_sparsity"]["grid"] == list(GRID)
    assert d["modules"]["a"]["act_threshold_grid"] == list(A_GRID)
    assert QuantizationConfig.from_dict(d) == q
    v1 = qconfig(version=1, grid=None)
    d1 = v1.to_dict()
    assert "grid" not in d1["activation_sparsity"] and "act_threshold_grid" not in d1["modules"]["a"]
    assert QuantizationConfig.from_dict(d1) == v1


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update(format_version=1), "needs format_version 2"),
    (lambda d: d["modules"]["a"].update(act_threshold_grid=[0.0, 0.25, 0.5]), "has 3 values"),
    (lambda d: d["modules"]["a"].pop("act_threshold_grid"), "has no values"),
    (lambda d: d["activation_sparsity"].pop("grid"), "activation_sparsity.grid is missing"),
    (lambda d: d["modules"]["b"].update(act_threshold_grid=[0.0, 0.3, 0.2, 0.4]), "decreases"),
    (lambda d: d["modules"]["b"].update(act_threshold_grid=[0.1, 0.2, 0.3, 0.4]), "starts at 0.1"),
    (lambda d: d["modules"]["b"].update(act_threshold_grid=[0.0, 0.2, float("nan"), 0.4]), "finite"),
    (lambda d: d["activation_sparsity"].update(grid=[0.0, 0.5, 0.25, 0.75]), "not an increasing list"),
    (lambda d: d["activation_sparsity"].update(grid=[0.0, 0.25, 0.6, 0.75]), "lacks the target"),
])
def test_inconsistent_grids_are_refused(edit, match):
    d = qconfig().to_dict()
    edit(d)
    with pytest.raises(CheckpointError, match=match):
        QuantizationConfig.from_dict(d)


def test_selection_rules():
    q = qconfig()
    assert select_thresholds(q, 0.0) == {"a": 0.0, "b": 0.0}  # off
    assert select_thresholds(q, 0.5) == {"a": 0.5, "b": 0.375}  # the calibrated thresholds
    assert select_thresholds(q, 0.25) == {"a": 0.25, "b": 0.125}  # a grid point
    # Between grid points: linear interpolation of the neighbours, in float32 as the kernels compare.
    got = select_thresholds(q, 0.6)
    assert got["a"] == f32(0.5 + 0.4 * 0.5) != 0.5 + 0.4 * 0.5 and got["b"] == 0.375
    assert select_thresholds(q, 0.75) == {"a": 1.0, "b": 0.375}  # the top of the grid


def test_the_calibrated_thresholds_win_over_a_grid_that_disagrees():
    """A tool may edit act_threshold alone; the default p_x then serves the edited value."""
    q = qconfig()
    q = replace(q, modules={**q.modules, "a": replace(q.modules["a"], act_threshold=0.45)})
    assert select_thresholds(q, 0.5)["a"] == 0.45


def test_selected_thresholds_are_monotone_in_p_x():
    q = qconfig()
    previous = {"a": -1.0, "b": -1.0}
    for i in range(76):
        p = i / 100
        now = select_thresholds(q, p)
        assert all(now[m] >= previous[m] for m in now), (p, now, previous)
        assert all(math.isfinite(t) and t == f32(t) for t in now.values())
        previous = now


@pytest.mark.parametrize("p,match", [(1.0, r"outside \[0, 1\)"), (-0.1, r"outside \[0, 1\)"),
                                     (float("nan"), r"outside \[0, 1\)"), (0.8, "above the largest calibrated")])
def test_bad_p_x_is_an_input_error_that_says_what_is_offered(p, match):
    with pytest.raises(InputError, match=match) as e:
        select_thresholds(q := qconfig(), p, where="CKPT")
    assert "offers any p_x in [0, 0.75]" in str(e.value) and e.value.exit_code == 2 and q


def test_v1_checkpoint_offers_only_its_calibrated_p_x():
    q = qconfig(version=1, grid=None)
    assert select_thresholds(q, 0.5) == {"a": 0.5, "b": 0.3}  # v1 without a grid: act_threshold as given
    assert select_thresholds(q, 0.0) == {"a": 0.0, "b": 0.0}
    with pytest.raises(InputError, match=r"\(format v1\) has no threshold grid.*p_x 0.5 \(its calibrated "
                                         r"thresholds\) or 0 \(off\).*Re-prune"):
        select_thresholds(q, 0.3, where="CKPT")
    off = replace(q, activation_sparsity=ActivationSparsity(), modules={
        n: replace(m, act_threshold=0.0) for n, m in q.modules.items()})
    with pytest.raises(InputError, match="p_x 0 only"):
        select_thresholds(off, 0.5)
