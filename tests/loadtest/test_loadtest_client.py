"""The timed client, metrics, prompts and quality helpers, against a scripted endpoint (seconds)."""
from __future__ import annotations

import math
import time

import pytest
import requests
from fake_openai import FakeOpenAI

from duoserve.errors import InputError
from duoserve.loadtest import client, metrics, quality
from duoserve.loadtest.prompts import PromptSampler, load_documents
from duoserve.loadtest.servers import check_target_host, is_loopback


def _send(fake, api="chat", stream=True, max_tokens=5, timeout=10.0, key=None):
    body = client.build_payload(api, "fake-model", "hello", max_tokens, stream=stream)
    with requests.Session() as s:
        return client.send(s, fake.url, api, body, key, timeout)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_stream_timings_match_the_script(api):
    with FakeOpenAI(first_delay_s=0.10, token_delay_s=0.05) as fake:
        rec = _send(fake, api=api, max_tokens=6)
    assert rec.ok, rec.error
    assert rec.output_tokens == 6 and rec.prompt_tokens == 7
    assert 0.09 <= rec.ttft_s < 0.4  # the empty role event of chat is not a token
    assert len(rec.itl_s) == 5 and all(0.04 <= g < 0.3 for g in rec.itl_s)
    assert rec.ttft_s <= rec.e2e_s
    assert rec.tpot_s == pytest.approx((rec.e2e_s - rec.ttft_s) / 5)
    assert 0.04 <= rec.tpot_s < 0.3
    assert rec.tokens_per_s == pytest.approx(6 / rec.e2e_s)
    body = fake.requests[-1]
    assert body["ignore_eos"] is True and body["min_tokens"] == 6
    assert body["stream_options"] == {"include_usage": True}


def test_non_streamed_has_no_ttft():
    with FakeOpenAI(first_delay_s=0.02, token_delay_s=0.01) as fake:
        rec = _send(fake, api="completions", stream=False, max_tokens=4)
    assert rec.ok and rec.output_tokens == 4
    assert rec.ttft_s is None and rec.tpot_s is None and rec.itl_s == []
    assert rec.e2e_s >= 0.04


@pytest.mark.parametrize("mode, expect", [("busy", "HTTP 503: The engine is currently busy"),
                                          ("cut", "stream error"),
                                          ("drop", "connection closed by the server without a response"),
                                          ("midstream_error", "stream error: engine died")])
def test_failures_are_readable(mode, expect):
    with FakeOpenAI(mode=mode, tokens=6, first_delay_s=0.01, token_delay_s=0.01) as fake:
        rec = _send(fake, max_tokens=6)
    assert not rec.ok
    assert rec.error.startswith(expect), rec.error


def test_stalled_server_times_out_instead_of_hanging():
    with FakeOpenAI(mode="stall") as fake:
        t0 = time.monotonic()
        rec = _send(fake, timeout=1.0)
        assert time.monotonic() - t0 < 5
    assert not rec.ok and rec.error.startswith("timeout")


def test_refused_connection_is_a_failure_not_an_exception():
    with FakeOpenAI() as fake:
        url = fake.url
    rec = _send(type("F", (), {"url": url})())
    assert not rec.ok and rec.status == 0 and rec.error.startswith("connection error")


def test_api_key_is_sent():
    with FakeOpenAI(api_key="k1") as fake:
        assert _send(fake, key="k1").ok
        rec = _send(fake, key="wrong")
        assert rec.status == 401 and "Unauthorized" in rec.error
        with requests.Session() as s:
            assert client.served_model(s, fake.url + "/v1/", "k1") == "fake-model"


def test_base_url_and_payload_validation():
    assert client.base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError):
        client.base_url("127.0.0.1:8000")
    with pytest.raises(ValueError):
        client.build_payload("embeddings", "m", "p", 4, stream=False)
    natural = client.build_payload("completions", "m", "p", 4, stream=False, fixed_length=False)
    assert "ignore_eos" not in natural and "stream" not in natural


def test_percentiles_match_numpy():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    values = list(rng.exponential(size=101))
    for q in (50, 90, 99):
        assert metrics.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    d = metrics.describe([])
    assert d["count"] == 0 and math.isnan(d["mean"])


def test_records_round_trip_and_summary(tmp_path):
    import csv

    recs = [metrics.RequestRecord(start=100.0 + i, api="chat", stream=True, ok=True, status=200, prompt_tokens=10,
                                  output_tokens=5, ttft_s=0.1, e2e_s=0.5, itl_s=[0.1] * 4, users=2) for i in range(3)]
    recs.append(metrics.RequestRecord(start=103.0, api="chat", stream=True, status=503, error="HTTP 503: busy",
                                      e2e_s=0.01, users=2))
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=metrics.RECORD_FIELDS)
        w.writeheader()
        for r in recs:
            w.writerow(r.row())
    rows = metrics.read_records(path)
    assert rows[0]["tpot_s"] == pytest.approx(0.1) and rows[0]["itl_s"] == [0.1] * 4
    s = metrics.summarize(rows)
    assert (s["requests"], s["ok"], s["failures"]) == (4, 3, 1)
    assert s["errors"] == {"HTTP 503": 1}
    assert s["wall_s"] == pytest.approx(3.01) and s["token_throughput"] == pytest.approx(15 / 3.01)
    assert s["itl_s"]["count"] == 12 and s["e2e_s"]["median"] == pytest.approx(0.5)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a duoserve request CSV"):
        metrics.read_records(tmp_path / "bad.csv")


def test_prompts_are_seeded_real_text(tmp_path):
    a = PromptSampler.from_source("c4", 20, seed=3).take(5)
    b = PromptSampler.from_source("c4", 20, seed=3).take(5)
    c = PromptSampler.from_source("c4", 20, seed=4).take(5)
    assert a == b and a != c
    assert all(len(p.split()) == 20 for p in a)
    wiki = load_documents("wiki")
    assert len(wiki) > 1000 and not any("<doc" in d for d in wiki[:50])
    (tmp_path / "t.jsonl").write_text('{"text": "one two three four"}\n{"text": "five six"}\n')
    assert load_documents(str(tmp_path / "t.jsonl")) == ["one two three four", "five six"]
    assert PromptSampler.from_source(str(tmp_path / "t.jsonl"), 3).sample() in ("one two three", "two three four")
    # Too little text, a missing file, a bad line: clear errors.
    with pytest.raises(InputError, match="fewer than one prompt"):
        PromptSampler.from_source(str(tmp_path / "t.jsonl"), 100)
    with pytest.raises(InputError, match="neither"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_documents(str(tmp_path / "bad.jsonl"))


def test_agreement():
    a = [{"prompt": "p", "tokens": ["a", "b", "c"]}, {"prompt": "q", "tokens": ["x", "y"]}]
    b = [{"prompt": "p", "tokens": ["a", "b", "d"]}, {"prompt": "q", "tokens": ["x", "y"]}]
    r = quality.agreement(a, b)
    assert r["exact_match"] == 0.5 and r["token_agreement"] == pytest.approx(4 / 5)
    assert r["mean_common_prefix"] == 2.0
    with pytest.raises(ValueError, match="different prompts"):
        quality.agreement(a, b[:1])


def test_only_loopback_targets_by_default():
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1/v1")
    check_target_host("http://127.0.0.1:8000", allow_remote=False)
    with pytest.raises(InputError, match="--allow-remote"):
        check_target_host("http://10.11.12.13:8000", allow_remote=False)
