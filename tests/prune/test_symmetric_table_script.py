"""scripts/symmetric_table.py: how cached rows become the table of docs/reports/symmetric-smollm2 (no pruning run)."""
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


def test_a_row_runs_through_the_prune_api_as_prune_model_does(tmp_path, tiny_llama_dir):
    """Runner.run prunes a copy of the loaded model with prune_model's steps (no checkpoint) and
    reports the row's fields; with p_x > 0 its thresholds are those prune_model writes."""
    import argparse

    st = _script()
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of some calibration text about topic {i % 5} and more" for i in range(400)))
    args = argparse.Namespace(model=str(tiny_llama_dir), calib_data=str(text), nsamples=4, seqlen=32,
                              threshold_nsamples=2, seed=0, data=str(text), eval_seqlen=32, max_windows=2,
                              eval_batch_size=1, device="cpu", work=tmp_path)
    runner = st.Runner(args)
    cfg = st.row("wanda", "0.5", 0, p_x=0.5)
    out = runner.run(cfg)
    assert set(out) == {"ppl", "weight_sparsity", "prune_seconds", "mean_layer_error", "method_args", "refine_args"}
    assert abs(out["weight_sparsity"] - 0.5) < 0.01 and out["ppl"] > 1 and out["refine_args"] is None
    assert abs(runner.check_cli(cfg, tmp_path)["ppl_cli"] - out["ppl"]) < 1e-3 * out["ppl"]  # the CLI path agrees
