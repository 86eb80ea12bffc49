"""`duoserve frontier` end to end on the tiny Llama of the fixtures, with the real commands.

Quality only (--no-speed: answers in-process) in the default run: one DuoGPT checkpoint evaluated
at two serve-time p_x (about a minute on 2 cores, mostly interpreter starts). The served part
(vLLM starts three times) is marked slow: `pytest -m "slow and vllm" tests/frontier`.
"""
from __future__ import annotations

import importlib.util
import json

import pytest

from duoserve.cli import main

TINY = ["--methods", "duogpt", "--sparsities", "0.5", "--serve-px", "0,0.5", "--nsamples", "4", "--seqlen", "64",
        "--data", "wiki", "--eval-seqlen", "64", "--max-windows", "2", "--answer-tokens", "12"]


def test_frontier_quality_on_tiny_model(tiny_llama_dir, tmp_path, capsys):
    work = tmp_path / "work"
    argv = ["frontier", str(tiny_llama_dir), *TINY, "--no-speed", "--work", str(work)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[  1/7] prune    duogpt W0.5 (pruned for X0.5): to run ..." in out
    summary = json.loads((work / "frontier.json").read_text())
    rows = summary["rows"]
    assert [r["point"] for r in rows] == ["dense", "duogpt W0.5 X0 (pruned for X0.5)",
                                          "duogpt W0.5 X0.5 (pruned for X0.5)"]
    for r in rows:
        assert r["ppl"] > 1 and r["ppl_windows"] == 2 and len(r["answers"]) == 4
        assert r["answers_from"].startswith("in-process")
    assert rows[2]["realized_px"] == pytest.approx(0.5, abs=0.1)  # served at 0.5 from the stored grid
    assert rows[1]["realized_px"] < 0.01  # p_x 0: only inputs that are exactly 0
    assert 0.45 < rows[1]["realized_weight_sparsity"] < 0.55
    assert "still_answers" in rows[1] and summary["choice"]["reason"]
    md = (work / "frontier.md").read_text()
    assert "2 windows of 64 tokens" in md and "| duogpt W0.5 X0.5 (pruned for X0.5)" in md.replace("**", "")
    assert (work / "frontier.png").is_file()

    # A rerun reuses every result: no command runs, the same table comes out.
    assert main(argv) == 0
    assert capsys.readouterr().out.count(": cached") == 7
    assert json.loads((work / "frontier.json").read_text())["rows"] == rows


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_frontier_speed_on_tiny_model(tiny_llama_dir, tmp_path):
    work = tmp_path / "work"
    argv = ["frontier", str(tiny_llama_dir), *TINY, "--work", str(work), "--duration", "4", "--max-tokens", "8",
            "--prompt-words", "16", "--enforce-eager", "--max-model-len", "256", "--throughput-users", "2"]
    assert main(argv) == 0
    rows = json.loads((work / "frontier.json").read_text())["rows"]
    for r in rows:
        assert r["tpot_s"] > 0 and r["throughput"] > 0 and r["throughput_users"] == 2
        assert r["answers_from"].startswith("endpoint") and len(r["answers"]) == 4
    assert "TPOT b1 ms" in (work / "frontier.md").read_text()
