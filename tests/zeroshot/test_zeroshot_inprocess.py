"""All seven tasks in-process on the tiny model, through the CLI, with a small --limit."""
from __future__ import annotations

import json
import math

from duoserve.cli import main
from duoserve.prune.zeroshot.tasks import SEVEN_TASKS, TASKS

LIMIT = 3


def test_all_tasks_in_process(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "zs.json"
    rc = main(["eval", "zeroshot", str(tiny_llama_dir), "--tasks", "all", "--limit", str(LIMIT),
               "--data", "offline", "--dtype", "float32", "--batch-size", "8", "--json", str(out),
               "--save-loglikelihoods", "--markdown-label", "tiny"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "avg7 (7)" in table and "| tiny |" in table
    summary = json.loads(out.read_text())
    assert list(summary["tasks"]) == list(SEVEN_TASKS)
    for name, row in summary["tasks"].items():
        assert row["n"] == LIMIT, name
        assert row["n_available"] == TASKS[name].offline_n, name
        assert math.isfinite(row["acc"]) and 0 <= row["acc"] <= 1, name
        assert (row["acc_norm"] is not None) == TASKS[name].has_acc_norm, name
        lls = summary["loglikelihoods"][name]
        assert len(lls) == LIMIT and all(math.isfinite(x) and x <= 0 for v in lls.values() for x in v), name
    for key in ("avg5", "avg7"):
        assert math.isfinite(summary["averages"][key]["acc"])
    model = summary["setup"]["model"]
    assert model["kind"] == "in-process" and model["activation_mode"] == "off" and model["dtype"] == "float32"
