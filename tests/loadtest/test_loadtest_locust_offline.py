"""The locust file and `duoserve bench` against a scripted endpoint (no vLLM; ~20 s)."""
from __future__ import annotations

import csv

import pytest
from fake_openai import FakeOpenAI
from loadtest_helpers import run_locust, stats_rows

from duoserve.cli import main as duoserve_main
from duoserve.loadtest.metrics import read_records


def test_locust_headless_records_custom_metrics(tmp_path):
    with FakeOpenAI(first_delay_s=0.03, token_delay_s=0.01, api_key="k") as fake:
        p = run_locust(fake.url, tmp_path, "-u", "2", "-r", "2", "-t", "3s", "--max-tokens", "8",
                       env={"LOCUST_API_KEY": "k"})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = stats_rows(tmp_path / "run")
    for kind in ("POST", "TTFT", "TPOT", "ITL", "E2E", "TOKENS_PER_S"):
        row = rows[(kind, "chat stream")]
        assert int(row["Request Count"]) > 0 and int(row["Failure Count"]) == 0, kind
    assert float(rows[("TTFT", "chat stream")]["Average Response Time"]) <= float(
        rows[("E2E", "chat stream")]["Average Response Time"])
    recs = read_records(tmp_path / "requests.csv")
    assert recs and all(r["ok"] and r["output_tokens"] == 8 and r["ttft_s"] <= r["e2e_s"] for r in recs)
    assert {r["users"] for r in recs} <= {1, 2}
    # Locust's CSV holds the final numbers (not those of its last once-a-second write).
    assert int(rows[("E2E", "chat stream")]["Request Count"]) == len(recs)


def test_locust_max_requests_and_failures(tmp_path):
    with FakeOpenAI(mode="busy") as fake:
        p = run_locust(fake.url, tmp_path, "-u", "3", "-r", "3", "-t", "30s", "--max-requests", "7",
                       "--api", "completions", "--no-stream", "--model", "m", "--exit-code-on-error", "0", timeout=30)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = read_records(tmp_path / "requests.csv")
    assert len(recs) == 7 and not any(r["ok"] for r in recs)
    with open(tmp_path / "run_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    assert failures and "HTTP 503: The engine is currently busy" in failures[0]["Error"]


def test_locust_refuses_bad_configuration(tmp_path):
    with FakeOpenAI(api_key="k") as fake:
        p = run_locust(fake.url, tmp_path, "-u", "1", "-r", "1", "-t", "20s", env={"LOCUST_API_KEY": "wrong"})
        assert p.returncode == 2 and "HTTP 401" in p.stderr
        p = run_locust(fake.url, tmp_path, "-u", "1", "-r", "1", "-t", "20s", "--prompt-source", "/no/such/file")
        assert p.returncode == 2 and "/no/such/file" in p.stderr


def test_bench_writes_report_from_locust_csvs(tmp_path, capsys):
    out = tmp_path / "report"
    with FakeOpenAI(first_delay_s=0.02, token_delay_s=0.005) as fake:
        rc = duoserve_main(["bench", "--dense", fake.url, "--sparse", fake.url + "/v1", "--users", "1,2",
                            "--duration", "1", "--max-tokens", "6", "--prompt-words", "8", "--skip-quality",
                            "--out", str(out)])
    assert rc == 0
    md = (out / "README.md").read_text()
    for heading in ("## Throughput and failures", "## TTFT (ms)", "## TPOT (ms)", "## ITL (ms)", "## E2E latency"):
        assert heading in md
    assert f"duoserve bench --dense {fake.url} --sparse {fake.url}/v1 --users 1,2 --duration 1.0" in md
    for png in ("latency_vs_concurrency.png", "throughput_vs_concurrency.png", "sparse_vs_dense.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [(r["server"], r["users"]) for r in summary] == [("dense", "1"), ("dense", "2"), ("sparse", "1"),
                                                            ("sparse", "2")]
    assert all(int(r["ok"]) > 0 and float(r["ttft_s_median"]) <= float(r["e2e_s_median"]) for r in summary)
    # The report can be rebuilt from the CSVs alone; a second run into the same folder is refused.
    (out / "README.md").unlink()
    assert duoserve_main(["bench", "--rebuild-report", str(out)]) == 0 and (out / "README.md").is_file()
    assert duoserve_main(["bench", "--dense", "http://127.0.0.1:9", "--out", str(out)]) == 2
    assert "already holds a report" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench"], "nothing to measure"),
    (["bench", "--dense", "http://192.0.2.1:8000"], "not a loopback address"),
    (["bench", "--dense", "/no/such/folder"], "neither an http(s) URL nor a model folder"),
    (["bench", "--dense", "http://127.0.0.1:9", "--users", "1,x"], "comma-separated integers"),
    (["bench", "--dense", "http://127.0.0.1:9", "--max-tokens", "0"], "must be positive"),
])
def test_bench_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    assert duoserve_main([*argv, "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
