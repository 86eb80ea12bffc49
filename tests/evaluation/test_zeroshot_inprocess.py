"""All seven tasks in-process on the tiny model, through the CLI, with a small --limit."""
from __future__ import annotations

import json
import math

from duoserve.cli import main
from duoserve.evaluation.zeroshot.tasks import SEVEN_TASKS, TASKS

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


def test_pruned_checkpoint_gets_its_activation_sparsity(tiny_llama_dir, tmp_path):
    """A duoserve checkpoint is evaluated as `eval ppl` evaluates it: the checkpoint's thresholds by
    default, the papers' per-token top-k on request."""
    ckpt = tmp_path / "tiny-w50x50"
    assert main(["prune", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.5",
                 "--activation-sparsity", "0.5", "--nsamples", "2", "--seqlen", "64", "--threshold-nsamples", "2",
                 "-o", str(ckpt)]) == 0
    runs = {}
    for mode in ("default", "topk"):
        out = tmp_path / f"{mode}.json"
        extra = [] if mode == "default" else ["--activation-mode", "topk", "--activation-sparsity", "0.5"]
        assert main(["eval", "zeroshot", str(ckpt), "--tasks", "arc_easy", "--limit", "2", "--data", "offline",
                     "--json", str(out)] + extra) == 0
        runs[mode] = json.loads(out.read_text())
    assert runs["default"]["setup"]["model"]["activation_mode"] == "threshold"
    assert runs["default"]["setup"]["model"]["checkpoint"]["weight_sparsity"] == 0.5
    assert runs["default"]["setup"]["activation_sparsity_realized_mean"] > 0.2
    assert runs["topk"]["setup"]["model"]["activation_mode"] == "topk"
    # top-k zeroes floor(0.5 K) inputs of every token; inputs that already were 0 in bf16 (measured:
    # 0.53 in all on this model) add to it
    assert 0.5 <= runs["topk"]["setup"]["activation_sparsity_realized_mean"] < 0.6
    assert all(math.isfinite(r["tasks"]["arc_easy"]["acc"]) for r in runs.values())
