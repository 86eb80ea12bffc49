"""scripts/mask_structure.py: the numbers behind the SymWanda-weight note of docs/results.md, "Symmetric family"."""
from __future__ import annotations

import subprocess
import sys

import torch
from script_module import SCRIPTS, load_script

from duoserve.prune.sparsity import SparsityTarget

SCRIPT = SCRIPTS / "mask_structure.py"


def _script():
    return load_script("mask_structure")


def test_counts_dead_rows_and_columns_of_a_known_mask():
    ms = _script()
    w = torch.ones(4, 8)
    w[0] = 0.01  # the weakest row: magnitude at 25% layer-wide takes all 8 of its weights
    st = ms.structure(w, "magnitude", SparsityTarget.parse("0.25"), "layer")
    assert (st["rows"], st["cols"], st["rows_dead"], st["rows_near"], st["cols_dead"]) == (4, 8, 1, 1, 0)
    assert st["max_row"] == 1.0
    # Per-row selection cannot empty a row.
    st = ms.structure(w, "magnitude", SparsityTarget.parse("0.25"), "row")
    assert st["rows_dead"] == 0 and st["max_row"] == 0.25


def test_runs_on_a_model_folder_and_rejects_unknown_scores(tiny_llama_dir):
    run = [sys.executable, str(SCRIPT), "--model", str(tiny_llama_dir)]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "14 linears" in out.stdout  # 2 layers x 7 projections
    assert all(f"| {s} |" in out.stdout for s in ("magnitude", "ri", "symwanda-weight"))
    bad = subprocess.run(run + ["--scores", "magnitude,nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown score(s) nope" in bad.stderr
