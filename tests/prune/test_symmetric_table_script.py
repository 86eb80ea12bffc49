"""scripts/symmetric_table.py: how cached rows become docs/symmetric.md's table (no pruning run)."""
from __future__ import annotations

import json

from script_module import load_script


def _script():
    return load_script("symmetric_table")


def _row(st, method, sparsity, ppl, device, opts=None, refine=None):
    cfg = st.row(method, sparsity, 0, opts, refine)
    return cfg["key"], {**cfg, "ppl": ppl, "mean_layer_error": None, "settings": {"device": device}}


def test_stochria_cells_are_mean_and_sample_std_over_the_seeds_present_and_marked_by_device():
    st = _script()
    gpu, cpu = "cuda (one NVIDIA H200)", "cpu"
    res = {"dense": {"ppl": 20.0, "settings": {"device": gpu}}}
    seeds = [{"sample_seed": s} for s in (0, 1, 2)]
    res.update(dict(_row(st, "stochria", "0.5", p, gpu, o) for p, o in zip((10.0, 12.0, 14.0), seeds)))
    assert st._cell(res, "stochria", "0.5") == "12.00 ± 2.00"  # sample std, all seeds on the reference device
    res.update([_row(st, "stochria", "0.6", 100.0, cpu, seeds[0], "r2dsnot")])
    assert st._cell(res, "stochria", "0.6", refine="r2dsnot") == "100.00 (n=1) †"
    res.update([_row(st, "stochria", "0.6", 110.0, gpu, seeds[2], "r2dsnot")])
    # one seed of two from another device marks the cell
    assert st._cell(res, "stochria", "0.6", refine="r2dsnot") == "105.00 ± 7.07 (n=2) †"
    assert st._cell(res, "stochria", "2:4") == "n/r"
    assert st._cell(res, "wanda", "0.5") == "n/r"


def test_render_replaces_only_the_table_between_the_markers_and_lists_rows_not_run(tmp_path):
    st = _script()
    results = tmp_path / "results"
    results.mkdir()
    key, r = _row(st, "wanda", "0.5", 48.5, "cpu")
    (results / f"{key}.json").write_text(json.dumps(r))
    (results / "dense.json").write_text(json.dumps({"ppl": 20.8, "settings": {"device": "cpu"}}))
    doc = tmp_path / "doc.md"
    doc.write_text(f"prose before\n{st.START}\nold table\n{st.END}\nprose after\n")
    st.render(results, doc)
    text = doc.read_text()
    assert text.startswith("prose before\n") and text.endswith("prose after\n") and "old table" not in text
    assert "| Wanda | 48.50 |" in text and "Dense: **20.80**" in text
    n_grid = len(st.grid())
    assert f"Rows of the grid not run yet: {n_grid - 1} of {n_grid}" in text
