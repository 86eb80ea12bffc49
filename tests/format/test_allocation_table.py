"""The greedy allocation table in the metadata (`activation_sparsity.allocation`) and how readers
select thresholds from it (`select_thresholds(..., allocation="greedy")`). Pure metadata, no torch.

Rules: the table round-trips and is absent from files that have none (old checkpoints unchanged);
a table that is inconsistent (wrong modules, a target its K*N-weighted mean misses, decreasing,
above the grid, no grid) is a CheckpointError; a served average p_x on a target uses the table, one
between targets interpolates each module's p_x (so the weighted mean stays exactly p_x) and then
its threshold on the grid; p_x above the last target, outside [0, 1), or no table is an InputError.
"""
import pytest

from duoserve.errors import CheckpointError, InputError
from duoserve.format import ActivationSparsity, ModuleInfo, QuantizationConfig
from duoserve.format.allocation_table import ActivationAllocation, weighted_mean_px
from duoserve.format.thresholds import allocated_px, grid_threshold, select_thresholds

GRID = (0.0, 0.25, 0.5, 0.75)
A_GRID = (0.0, 0.25, 0.5, 1.0)
B_GRID = (0.0, 0.125, 0.375, 0.375)
# a: 4 x 8 = 32 weights, b: 4 x 24 = 96 weights; weighted mean = (32 p_a + 96 p_b) / 128
TARGETS = (0.25, 0.5)
TABLE = {"a": (0.25, 0.5), "b": (0.25, 0.5)}  # uniform-like at both
SKEWED = {"a": (0.0, 0.5), "b": (1 / 3, 0.5)}  # 96/3 / 128 = 0.25


def qconfig(table=SKEWED, targets=TARGETS, grid=GRID, with_alloc=True):
    modules = {"a": ModuleInfo((4, 8), 16, A_GRID[2], A_GRID if grid else None),
               "b": ModuleInfo((4, 24), 48, B_GRID[2], B_GRID if grid else None)}
    alloc = ActivationAllocation("greedy", targets, dict(table), {"search": "test"}) if with_alloc else None
    return QuantizationConfig(weight_format="bitmask", dtype="bfloat16", modules=modules,
                              format_version=2 if grid else 1,
                              activation_sparsity=ActivationSparsity(rule="threshold", target=0.5, grid=grid,
                                                                     allocation=alloc))


def test_table_roundtrips_and_is_absent_when_not_computed():
    q = qconfig()
    d = q.to_dict()
    assert d["activation_sparsity"]["allocation"]["targets"] == [0.25, 0.5]
    assert d["activation_sparsity"]["allocation"]["modules"]["b"] == [1 / 3, 0.5]
    assert QuantizationConfig.from_dict(d) == q
    plain = qconfig(with_alloc=False)
    assert "allocation" not in plain.to_dict()["activation_sparsity"]
    assert QuantizationConfig.from_dict(plain.to_dict()) == plain


@pytest.mark.parametrize("edit,match", [
    (lambda a: a.update(modules={"a": [0.0, 0.5]}), "differ"),
    (lambda a: a["modules"].update(a=[0.25, 0.5]), "weighted mean"),  # mean at 0.25 is then 0.3125
    (lambda a: a["modules"].update(b=[0.5, 1 / 3]), "non-decreasing"),
    (lambda a: a.update(targets=[0.5, 0.25]), "increasing"),
    (lambda a: a.update(targets=[0.0, 0.5]), "increasing"),
    (lambda a: a.update(method="optimal"), "not one of"),
    (lambda a: a.pop("targets"), "malformed"),
])
def test_inconsistent_tables_are_refused(edit, match):
    d = qconfig().to_dict()
    edit(d["activation_sparsity"]["allocation"])
    with pytest.raises(CheckpointError, match=match):
        QuantizationConfig.from_dict(d)


def test_a_table_needs_a_grid_and_stays_inside_it():
    d = qconfig().to_dict()
    d["activation_sparsity"].pop("grid")
    for m in d["modules"].values():
        m.pop("act_threshold_grid")
    with pytest.raises(CheckpointError, match="needs activation_sparsity.grid"):
        QuantizationConfig.from_dict(d)
    with pytest.raises(CheckpointError, match="above the grid"):  # mean 0.5, but 0.8 > 0.75
        qconfig(table={"a": (0.25, 0.8), "b": (0.25, 0.4)})


def test_greedy_selection_on_targets_between_them_and_below_the_first():
    q = qconfig()
    assert allocated_px(q, 0.25) == {"a": 0.0, "b": 1 / 3}
    assert allocated_px(q, 0.0) == {"a": 0.0, "b": 0.0}
    mid = allocated_px(q, 0.375)  # halfway between the targets
    assert mid == pytest.approx({"a": 0.25, "b": (1 / 3 + 0.5) / 2})
    low = allocated_px(q, 0.125)  # halfway between 0 (all off) and the first target
    assert low == pytest.approx({"a": 0.0, "b": 1 / 6})
    for p in (0.05, 0.125, 0.25, 0.3, 0.375, 0.5):
        assert weighted_mean_px(q.modules, allocated_px(q, p)) == pytest.approx(p, abs=1e-12)
    thr = select_thresholds(q, 0.25, allocation="greedy")
    assert thr["a"] == 0.0  # p_x 0: off
    assert thr["b"] == grid_threshold(GRID, B_GRID, 1 / 3)  # interpolated on b's grid
    assert B_GRID[1] < thr["b"] < B_GRID[2]
    on_grid = select_thresholds(q, 0.5, allocation="greedy")
    assert on_grid == {"a": A_GRID[2], "b": B_GRID[2]}


def test_greedy_thresholds_are_monotone_in_the_average():
    q = qconfig()
    prev = None
    for k in range(0, 51):
        thr = select_thresholds(q, k / 100, allocation="greedy")
        if prev is not None:
            assert all(thr[n] >= prev[n] for n in thr), (k, thr, prev)
        prev = thr


def test_uniform_selection_is_unchanged_by_a_table():
    with_table, without = qconfig(), qconfig(with_alloc=False)
    for p in (0.0, 0.1, 0.25, 0.33, 0.5, 0.75):
        assert select_thresholds(with_table, p) == select_thresholds(without, p) == \
            select_thresholds(with_table, p, allocation="uniform")


@pytest.mark.parametrize("p,match", [(0.6, "covers average p_x up to 0.5"), (1.0, "outside"), (-0.1, "outside"),
                                     (float("nan"), "outside")])
def test_bad_greedy_requests_say_what_is_offered(p, match):
    with pytest.raises(InputError, match=match):
        select_thresholds(qconfig(), p, allocation="greedy")


def test_greedy_without_a_table_is_a_clear_error():
    with pytest.raises(InputError, match="no allocation table.*duoserve allocate"):
        select_thresholds(qconfig(with_alloc=False), 0.5, "CKPT", allocation="greedy")
    with pytest.raises(InputError, match="no allocation table"):
        select_thresholds(qconfig(grid=None, with_alloc=False), 0.5, allocation="greedy")
    with pytest.raises(InputError, match="not one of uniform, greedy"):
        select_thresholds(qconfig(), 0.5, allocation="best")
