"""Locust's distributed mode (a master and local workers on loopback) against the scripted endpoint.

No vLLM; about 30 s on a 2-core machine (each distributed level starts three Python processes).
Workers on other machines are not tested here (docs/loadtest.md says what was run).
"""
from __future__ import annotations

import csv

import pytest
from fake_openai import FakeOpenAI
from loadtest_helpers import stats_rows

from duoserve.cli import main as duoserve_main
from duoserve.loadtest.metrics import read_records
from duoserve.loadtest.runner import Distribution, LoadSpec, run_level

WARM_UP_REQUESTS = 2  # duoserve bench sends two before measuring


def test_bench_with_two_local_workers_reports_every_request(tmp_path):
    out = tmp_path / "report"
    with FakeOpenAI(first_delay_s=0.02, token_delay_s=0.005) as fake:
        rc = duoserve_main(["bench", "--dense", fake.url, "--users", "4", "--duration", "3", "--max-tokens", "6",
                            "--prompt-words", "8", "--skip-quality", "--processes", "2", "--out", str(out)])
        served = len(fake.requests) - WARM_UP_REQUESTS
    assert rc == 0
    raw = out / "raw" / "dense"
    assert (raw / "u4_worker0.log").is_file() and (raw / "u4_worker1.log").is_file()
    recs = read_records(raw / "u4_requests.csv")
    # Every request the server saw is in the master's records, and both workers sent some.
    assert len(recs) == served > 0
    assert {r["worker"] for r in recs} == {"0", "1"}
    assert all(r["ok"] and r["output_tokens"] == 6 for r in recs)
    # Locust's master aggregated its own statistics over both workers.
    locust_rows = stats_rows(raw / "u4")
    assert int(locust_rows[("POST", "chat stream")]["Request Count"]) == served
    assert int(locust_rows[("TTFT", "chat stream")]["Request Count"]) == served
    # duoserve's metrics in the report count all of them.
    with open(out / "summary.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["requests"]) == int(row["ok"]) == served
    assert int(row["ttft_s_count"]) == int(row["tpot_s_count"]) == int(row["e2e_s_count"]) == served
    assert int(row["itl_s_count"]) == served * 5  # 6 tokens: 5 gaps per request
    md = (out / "README.md").read_text()
    assert "--processes 2" in md and "2 worker process(es)" in md


def test_max_requests_is_exact_across_workers(tmp_path):
    spec = LoadSpec(prompt_source="c4", prompt_words=8, max_tokens=4, duration_s=30, max_requests=25,
                    request_timeout_s=20)
    with FakeOpenAI(first_delay_s=0.01, token_delay_s=0.005) as fake:
        records = run_level(fake.url, 3, spec, tmp_path, dist=Distribution(processes=2))
        served = len(fake.requests)
    recs = read_records(records)
    assert served == len(recs) == 25
    assert {r["worker"] for r in recs} == {"0", "1"}


@pytest.mark.parametrize("argv, message", [
    (["--dense", "http://127.0.0.1:9", "--processes", "0"], "--processes must be at least 1"),
    (["--dense", "http://127.0.0.1:9", "--remote-workers", "1", "--master-port", "5557"], "cannot reach a master"),
    (["--dense", "http://127.0.0.1:9", "--remote-workers", "1", "--master-bind-host", "0.0.0.0"],
     "needs a fixed --master-port"),
    (["--dense", "http://127.0.0.1:9", "--master-port", "70000"], "must be a TCP port"),
    (["--worker-of", "10.0.0.5"], "HOST:PORT"),
    (["--worker-of", ""], "HOST:PORT"),
    (["--worker-of", "127.0.0.1:5557", "--dense", "http://127.0.0.1:9"], "runs only workers"),
])
def test_distributed_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    out = tmp_path / "r"
    if "--worker-of" not in argv:
        argv = [*argv, "--out", str(out)]
    assert duoserve_main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
