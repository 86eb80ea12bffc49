"""scripts/residual_default.py: DuoGPT's default residual fit and scale are chosen on held-out calibration text only."""
import json
import math
from pathlib import Path

import pytest

from script_module import load_script

rd = load_script("residual_default")
EVIDENCE = (Path(__file__).resolve().parents[2] / "docs" / "reports" / "duogpt-residual-2026-12-07"
            / "residual-default.json")


def obs(scale):
    return rd.Candidate(scale, "obs")


def cell(model, nll_by_scale, level="0.5"):
    """A cell of obs-fit candidates, keyed by scale."""
    return rd.Cell(model, level, {obs(k): v for k, v in nll_by_scale.items()})


def test_one_standard_error_rule_prefers_the_simpler_scale_inside_the_noise():
    # 0.5 is best on average by 0.01 nats, but the windows disagree by far more: 0.25 is within 1 SE
    noisy = [cell("a", {0.0: [5.3, 5.1, 5.5, 5.2], 0.25: [5.0, 4.8, 5.2, 4.9], 0.5: [4.9, 4.9, 5.1, 4.9]}),
             cell("b", {0.0: [4.6, 4.4, 4.5, 4.7], 0.25: [4.2, 4.0, 4.1, 4.3], 0.5: [4.3, 4.0, 4.0, 4.3]})]
    result = rd.choose(noisy)
    assert result["best"] == obs(0.5) and result["chosen"] == obs(0.25)
    assert not result["rows"][obs(0.0)]["within_1se"]


def test_a_clear_gain_is_taken():
    clear = [cell("a", {0.0: [5.0, 5.2, 5.1], 0.25: [4.8, 5.0, 4.9], 0.5: [4.6, 4.8, 4.7]})]
    assert rd.choose(clear)["chosen"] == obs(0.5)
    flat = [cell("a", {0.0: [5.0, 5.2, 5.1], 0.25: [5.0, 5.2, 5.1], 0.5: [5.0, 5.2, 5.1]})]
    assert rd.choose(flat)["chosen"] == obs(0.0)  # no gain at all: no residual


def test_between_fits_the_smaller_scale_then_the_lower_nll():
    ridge = lambda s: rd.Candidate(s, "ridge")  # noqa: E731
    nll = {obs(0.0): [5.4, 5.6], obs(0.25): [5.02, 5.21], ridge(0.0): [5.3, 5.5], ridge(0.25): [5.0, 5.2],
           ridge(0.5): [4.99, 5.2]}
    result = rd.choose([rd.Cell("a", "0.5", nll)])
    assert result["best"] == ridge(0.5)
    assert result["chosen"] == ridge(0.25)  # within 1 SE at the smaller scale, and ahead of obs 0.25 there
    assert rd.Candidate.parse("ridge 0.25") == ridge(0.25) and rd.Candidate.parse("0.5") == obs(0.5)


def test_only_levels_where_every_fit_has_its_whole_ladder_are_cells():
    levels = [lvl for lvl, _ in rd.ladder_levels(rd.candidates(["obs", "ridge"]))]
    assert levels == ["0.4", "0.5"]  # the ridge fit has only its 0.25 rung at 60%


def test_evaluation_text_is_refused(tmp_path):
    path = rd.eval_path(tmp_path, rd.candidates()[0][3])
    path.write_text(json.dumps({"data": "wikitext-2 raw test (x.raw)", "pruned": {"window_nll": [1.0, 2.0]}}))
    with pytest.raises(rd.NotHeldOut, match="c4-heldout"):
        rd.read_window_nll(path)
    path.write_text(json.dumps({"data": HELD, "pruned": {"ppl": 3.0}}))
    with pytest.raises(ValueError, match="per-window"):
        rd.read_window_nll(path)


HELD = "C4 sample packaged in exllamav3 (584 documents), held-out last 146 of 584 documents"


@pytest.mark.parametrize("fit", ["obs", "ridge"])
def test_load_cells_reads_the_suites_cache_keys_and_reports_gaps(tmp_path, fit):
    ladder = [c for c in rd.candidates(fit) if c[0] == "0.5"]
    assert sorted(c[2].scale for c in ladder) == [0.0, 0.25, 0.5]
    if fit == "ridge":  # rung 0 of the ridge fit is SparseGPT itself
        assert next(c for c in ladder if c[2].scale == 0.0)[3] == "sparsegpt-0.5-x0.5"
    for level, p_x, cand, key in ladder:
        scale = cand.scale
        if scale != 0.5:
            rd.eval_path(tmp_path, key).write_text(json.dumps({"data": HELD, "pruned": {"window_nll": [1.0 + scale, 2.0]}}))
    cells, missing = rd.load_cells([tmp_path], fit)
    assert cells == [] and len(missing) == 1 and "residualscale0.5" in missing[0]
    key = next(c[3] for c in ladder if c[2].scale == 0.5)
    rd.eval_path(tmp_path, key).write_text(json.dumps({"data": HELD, "pruned": {"window_nll": [1.5, 2.5]}}))
    cells, missing = rd.load_cells([tmp_path], fit)
    assert [c.level for c in cells] == ["0.5"] and not missing
    assert cells[0].window_nll[rd.Candidate(0.25, fit)] == [1.25, 2.0]


def test_duogpts_default_is_the_rules_choice_on_the_committed_evidence():
    """The default in the code is what the rule picks on the held-out evidence committed with it:
    changing one without the other fails here."""
    from duoserve.prune.methods.duogpt import DuoGPTOptions

    data = json.loads(EVIDENCE.read_text())
    cells = rd.cells_from_json(data)
    assert {c.model for c in cells} >= {"smol", "gemma"}, "the evidence must cover both models"
    result = rd.choose(cells)
    chosen = rd.Candidate.parse(data["chosen"], data.get("fit", "obs"))
    assert result["chosen"] == chosen
    defaults = DuoGPTOptions()
    for option, value in rd.FIT_OPTIONS[chosen.fit].items():
        assert getattr(defaults, option) == value, option
    assert math.isclose(float(defaults.residual_scale), chosen.scale)


def test_the_upstream_ladder_is_the_ridge_fit_without_the_dropped_part(tmp_path):
    import dataclasses

    from duoserve.prune.methods.duogpt import DuoGPTOptions

    ladder = rd.candidates("ridge-upstream")
    assert sorted({c[0] for c in ladder}) == ["0.4", "0.5"]
    assert sorted(c[2].scale for c in ladder if c[0] == "0.5") == [0.25, 0.5]
    assert all("residualdropped0" in c[3] for c in ladder)
    # every fit names options DuoGPT has, so the default test can compare them
    fields = {f.name for f in dataclasses.fields(DuoGPTOptions)}
    assert set(rd.FIT_OPTIONS) == set(rd.SUITES_OF_FIT)
    assert all(set(opts) <= fields for opts in rd.FIT_OPTIONS.values())
    both = rd.candidates(["ridge", "ridge-upstream"])
    assert rd.ladder_levels(both) == [("0.4", 0.4), ("0.5", 0.5)]
