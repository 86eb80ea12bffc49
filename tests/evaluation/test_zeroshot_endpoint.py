"""One task through a real served endpoint (vLLM CPU, duoserve's launcher), compared with in-process."""
from __future__ import annotations

import json
import math

import pytest

from duoserve.cli import main
from duoserve.evaluation.zeroshot.results import compare_loglikelihoods

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

TASK, LIMIT, MAX_LEN = "arc_easy", 8, 512


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    """One vLLM server per module on the tiny model (bf16, as served), stopped with its process group."""
    from duoserve.loaders.server import launch

    with launch(tiny_llama_dir, host="127.0.0.1", port=0, enforce_eager=True, kv_cache_gib=1,
                max_model_len=MAX_LEN) as srv:
        srv.wait_ready(timeout=420)
        yield srv


def _run(argv, out):
    assert main(argv + ["--tasks", TASK, "--limit", str(LIMIT), "--data", "offline", "--save-loglikelihoods",
                        "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_task_through_endpoint_matches_in_process(server, tiny_llama_dir, tmp_path):
    served = _run(["eval", "zeroshot", str(tiny_llama_dir), "--endpoint", server.url, "--api-key", server.api_key,
                   "--batch-size", "4"], tmp_path / "endpoint.json")
    row = served["tasks"][TASK]
    assert row["n"] == LIMIT and math.isfinite(row["acc"]) and math.isfinite(row["acc_norm"])
    assert served["setup"]["model"]["kind"] == "endpoint"
    assert served["setup"]["model"]["max_length"] == MAX_LEN  # read from the server's /v1/models

    local = _run(["eval", "zeroshot", str(tiny_llama_dir), "--dtype", "float32", "--max-length", str(MAX_LEN)],
                 tmp_path / "local.json")
    agreement = compare_loglikelihoods(local, served)[TASK]
    assert agreement["items"] == LIMIT
    # The same requests scored by vLLM (bf16) and transformers (fp32): log-likelihoods of whole
    # continuations agree to a small fraction of their size (measured: mean |dLL| ~0.15 nats on
    # ~75 nats); a wrong prompt split (echo offsets, BOS) would be off by whole tokens (several nats).
    mean_ll = sum(abs(x) for v in local["loglikelihoods"][TASK].values() for x in v) / agreement["requests"]
    assert agreement["mean_abs_diff"] < 0.02 * mean_ll, agreement
    assert agreement["same_prediction"] >= 0.75, agreement


def test_wrong_api_key_is_a_clear_error(server, tiny_llama_dir, capsys):
    rc = main(["eval", "zeroshot", str(tiny_llama_dir), "--endpoint", server.url, "--api-key", "wrong",
               "--tasks", TASK, "--limit", "1"])
    assert rc == 2
    assert "HTTP 401" in capsys.readouterr().err
