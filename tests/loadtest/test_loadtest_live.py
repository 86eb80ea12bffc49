"""The load-test tools against a real vLLM server on 127.0.0.1 (tiny model; one server per module).

The server is plain vLLM (duoserve's plugin disabled): the tools must work against any
OpenAI-compatible endpoint. It runs with a small admission limit (--max-num-seqs 4,
--max-num-queued-reqs 8, duoserve's overload policy in miniature, see docs/loadtest.md) so the
overload test can go far over capacity in seconds.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from loadtest_helpers import run_locust, stats_rows

from duoserve.cli import main as duoserve_main
from duoserve.loadtest import client
from duoserve.loadtest.metrics import read_records
from duoserve.loadtest.runner import LOCUSTFILE

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]

API_KEY = "test-key"
DROPPED = "connection closed by the server without a response"
MAX_NUM_SEQS, MAX_QUEUED = 4, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_PLUGINS": ""}  # "": load no plugin
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_llama_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
           "--enforce-eager", "--dtype", "bfloat16", "--max-model-len", "512",
           "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-queued-reqs", str(MAX_QUEUED)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if requests.get(url + "/v1/models", headers=client.headers(API_KEY), timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not ready in 300 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def prometheus(url: str, name: str) -> float:
    """Sum of a vLLM /metrics series over its labels."""
    text = requests.get(url + "/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def wait_idle(url: str, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if prometheus(url, "vllm:num_requests_running") == 0 and prometheus(url, "vllm:num_requests_waiting") == 0:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"server still busy {timeout} s later")


def test_locust_headless_chat_stream(server, tmp_path):
    p = run_locust(server, tmp_path, "-u", "2", "-r", "2", "-t", "8s", "--max-tokens", "32", "--prompt-words", "32",
                   env={"LOCUST_API_KEY": API_KEY})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = stats_rows(tmp_path / "run")
    for kind in ("POST", "TTFT", "TPOT", "ITL", "E2E", "TOKENS_PER_S"):
        assert int(rows[(kind, "chat stream")]["Request Count"]) > 0, kind
    assert int(rows[("POST", "chat stream")]["Failure Count"]) == 0
    recs = read_records(tmp_path / "requests.csv")
    assert len(recs) >= 4
    for r in recs:
        assert r["ok"] and r["status"] == 200
        assert r["output_tokens"] == 32 and r["prompt_tokens"] > 10  # fixed length; real text prompt
        assert 0 < r["ttft_s"] <= r["e2e_s"] < 30
        assert r["tpot_s"] >= 0 and r["tokens_per_s"] > 0 and len(r["itl_s"]) > 0


def test_locust_completions_not_streamed_stops_after_max_requests(server, tmp_path):
    t0 = time.monotonic()
    p = run_locust(server, tmp_path, "-u", "2", "-r", "2", "-t", "120s", "--max-requests", "6", "--api",
                   "completions", "--no-stream", "--max-tokens", "16", env={"LOCUST_API_KEY": API_KEY})
    assert p.returncode == 0, p.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    recs = read_records(tmp_path / "requests.csv")
    assert len(recs) == 6 and all(r["ok"] and r["output_tokens"] == 16 and r["ttft_s"] is None for r in recs)


def test_locust_web_ui(server, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--web-host", "127.0.0.1", "--web-port", str(port),
           "--host", server]
    with open(tmp_path / "ui.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "LOCUST_API_KEY": API_KEY})
    ui = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                page = requests.get(ui + "/", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert page.status_code == 200 and "max_tokens" in page.text and API_KEY not in page.text
        # What the start form sends, custom options included.
        r = requests.post(ui + "/swarm", data={"user_count": 2, "spawn_rate": 2, "host": server, "run_time": "20s",
                                               "max_tokens": "8", "api": "completions"}, timeout=5)
        assert r.json()["success"], r.text
        kinds = set()
        for _ in range(60):
            stats = requests.get(ui + "/stats/requests", timeout=5).json()
            kinds = {s["method"] for s in stats["stats"] if s["num_requests"] > 0}
            if {"TTFT", "TPOT", "ITL", "E2E"} <= kinds:
                break
            time.sleep(0.5)
        assert {"POST", "TTFT", "TPOT", "ITL", "E2E", "TOKENS_PER_S"} <= kinds
        assert stats["fail_ratio"] == 0 and any(s["name"] == "completions stream" for s in stats["stats"])
        requests.post(ui + "/stop", timeout=10)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_bench_report_with_quality(server, tmp_path):
    out = tmp_path / "report"
    rc = duoserve_main(["bench", "--dense", server, "--sparse", server + "/v1", "--api-key", API_KEY,
                        "--users", "1,2", "--duration", "3", "--max-tokens", "16", "--prompt-words", "24",
                        "--ppl-windows", "4", "--ppl-words", "64", "--greedy-prompts", "4", "--greedy-tokens", "8",
                        "--out", str(out)])
    assert rc == 0
    md = (out / "README.md").read_text()
    assert "## Quality through the endpoint" in md and "'***'" in md and API_KEY not in md
    for png in ("latency_vs_concurrency.png", "throughput_vs_concurrency.png", "sparse_vs_dense.png"):
        assert (out / png).stat().st_size > 5000
    with open(out / "quality.csv", newline="") as f:
        q = {r["server"]: r for r in csv.DictReader(f)}
    # The same server twice: identical perplexity and outputs; a random tiny model scores near its vocab size.
    assert float(q["dense"]["ppl"]) == pytest.approx(float(q["sparse"]["ppl"]), rel=1e-6)
    assert 10 < float(q["dense"]["ppl"]) < 1e6 and int(q["dense"]["tokens"]) > 100
    assert float(q["sparse"]["exact_match"]) == 1.0 and float(q["sparse"]["token_agreement"]) == 1.0
    with open(out / "summary.csv", newline="") as f:
        for r in csv.DictReader(f):
            assert int(r["failures"]) == 0 and int(r["ok"]) > 0
            assert float(r["ttft_s_p99"]) <= float(r["e2e_s_p99"]) and float(r["token_throughput"]) > 0
    assert json.loads((out / "run.json").read_text())["load"]["max_tokens"] == 16


def test_overload_gives_readable_errors_and_recovers(server, tmp_path):
    """16 closed-loop users against 4 slots + 4 queue places: 503s with a message, never a hang or a 500."""
    t0 = time.monotonic()
    p = run_locust(server, tmp_path, "-u", "16", "-r", "16", "-t", "6s", "--max-tokens", "96", "--prompt-words",
                   "16", "--exit-code-on-error", "0", "--request-timeout", "30", "--failure-backoff", "0.1",
                   env={"LOCUST_API_KEY": API_KEY}, timeout=90)
    assert p.returncode == 0, p.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    recs = read_records(tmp_path / "requests.csv")
    failed = [r for r in recs if not r["ok"]]
    assert failed and any(r["ok"] for r in recs), "expected both served and refused requests"
    # Refused either with HTTP 503 or, for a stream whose 200 header already went out, with an
    # error event carrying code 503; both say why. On a starved 2-core machine uvicorn (vLLM's HTTP
    # server) also, rarely, closes a connection without answering: the request never reached vLLM
    # (its access log lacks it; docs/loadtest.md). That is a failure with status 0, named as such.
    busy = [r for r in failed if r["status"] == 503]
    dropped = [r for r in failed if r["status"] == 0]
    assert busy and len(busy) + len(dropped) == len(failed), {r["status"] for r in failed}
    assert all("currently busy" in r["error"] for r in busy)
    assert all(r["error"].startswith(DROPPED) for r in dropped)
    assert len(dropped) < len(busy)
    with open(tmp_path / "run_failures.csv", newline="") as f:
        assert all("currently busy" in row["Error"] or DROPPED in row["Error"] for row in csv.DictReader(f))
    # Recovery: the queue drains and a new request is served normally.
    wait_idle(server, timeout=30)
    body = client.build_payload("chat", "tiny", "Hello there", 8, stream=True)
    with requests.Session() as s:
        rec = client.send(s, server, "chat", body, API_KEY, 30)
    assert rec.ok and rec.output_tokens == 8


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "not-streamed"])
def test_client_that_goes_away_frees_the_server(server, stream):
    """A client that disconnects (mid-stream, or by timing out on a whole response) leaks no work."""
    wait_idle(server)
    tokens_before = prometheus(server, "vllm:generation_tokens_total")
    latency_before = prometheus(server, "vllm:e2e_request_latency_seconds_sum")
    body = client.build_payload("completions", "tiny", "Once upon a time", 480, stream=stream)
    if not stream:
        # 8 sequences of 480 tokens and a 20 ms read timeout: one sequence alone (the context allows
        # no more) finished within a 0.2 s timeout on every run on the Zen 5 host (2026-11-27), and
        # 8 within 0.2 s on most, leaving nothing to abort
        body["n"] = 8
        body["temperature"] = 1.0  # vLLM refuses n > 1 with greedy sampling
    total = 480 * body.get("n", 1)
    if stream:
        t_sent = time.monotonic()
        resp = requests.post(server + "/v1/completions", json=body, headers=client.headers(API_KEY), stream=True,
                             timeout=30)
        lines = resp.iter_lines()
        received = 0
        while received < 3:
            if next(lines).startswith(b"data:"):
                received += 1
        resp.close()  # the client goes away mid-stream
        t_gone = time.monotonic() - t_sent
    else:
        try:
            resp = requests.post(server + "/v1/completions", json=body, headers=client.headers(API_KEY),
                                 timeout=(5, 0.02))
        except requests.Timeout:
            pass  # the client gave up while the server was generating: what this case tests
        else:
            # Even so the tiny model may finish before the read timeout: nothing was left to abort.
            assert resp.status_code == 200, resp.text
            pytest.skip(f"the server answered the whole request before the client's timeout: HTTP "
                        f"{resp.status_code}, {resp.text[:300]}")
    assert wait_idle(server, timeout=10) < 10
    generated = prometheus(server, "vllm:generation_tokens_total") - tokens_before
    if stream and generated >= total / 2:
        # On a busy machine the tiny model can outrun a starved client: if the client left only after
        # the server had spent half of the request's time, there was not much left to free. A server
        # that ignores disconnects still fails: its request lasts far longer than the client stayed.
        latency = prometheus(server, "vllm:e2e_request_latency_seconds_sum") - latency_before
        if t_gone > latency / 2:
            pytest.skip(f"the client left after {t_gone:.2f} s of a {latency:.2f} s request")
    assert generated < total / 2, f"the server kept generating for a gone client ({generated:.0f} of {total})"


def test_wrong_api_key_is_refused_before_load(server, tmp_path):
    p = run_locust(server, tmp_path, "-u", "1", "-r", "1", "-t", "20s", env={"LOCUST_API_KEY": "wrong"})
    assert p.returncode == 2 and "HTTP 401" in p.stderr
