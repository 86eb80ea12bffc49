"""`duoserve serve CKPT --activation-sparsity P --allocation greedy`: per-linear p_x from the
checkpoint's greedy allocation table (`duoserve allocate`), in every vLLM process.

In this process: vLLM linear layers built under DUOSERVE_ACTIVATION_ALLOCATION=greedy hold the
thresholds `select_thresholds(..., allocation="greedy")` gives; the launcher passes the choice
to vLLM's environment, defaults the average to the calibrated p_x, and refuses (exit code 2,
before vLLM starts) a checkpoint without a table or an average above its last target.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from duoserve.format.io import load_checkpoint
from duoserve.format.thresholds import SERVE_ACTIVATION_SPARSITY_ENV, SERVE_ALLOCATION_ENV, select_thresholds
from test_serve_activation_sparsity import DOWN, QKV, _check_layer, _served_layer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def greedy_ckpt(bitmask_ckpt, tmp_path_factory):
    from duoserve.prune.allocate_cli import allocate_checkpoint

    out = tmp_path_factory.mktemp("alloc") / "tiny-greedy"
    allocate_checkpoint(bitmask_ckpt, out, targets=(0.3, 0.5, 0.7), nsamples=2, seqlen=32)
    return out


@pytest.mark.parametrize("shards", [QKV, DOWN], ids=["qkv_proj", "down_proj"])
@pytest.mark.parametrize("p_x", [0.5, 0.4])
def test_vllm_layer_serves_the_greedy_thresholds(vllm_layers, greedy_ckpt, monkeypatch, shards, p_x):
    q = load_checkpoint(greedy_ckpt).qconfig
    monkeypatch.setenv(SERVE_ALLOCATION_ENV, "greedy")
    layer = _served_layer(greedy_ckpt, shards, monkeypatch, p_x)
    want = select_thresholds(q, p_x, allocation="greedy")
    assert want != select_thresholds(q, p_x)  # the table is not uniform: the option must change something
    _check_layer(layer, greedy_ckpt, shards, want)


def test_launcher_passes_the_allocation_and_defaults_the_average(greedy_ckpt, recorded_launches, monkeypatch):
    from duoserve.loaders import server

    monkeypatch.setattr(server, "is_cpu_build", lambda: True)
    server.launch(greedy_ckpt, log_path="-", allocation="greedy")
    server.launch(greedy_ckpt, log_path="-", activation_sparsity=0.4)
    (_, env_greedy), (_, env_uniform) = recorded_launches
    assert env_greedy[SERVE_ALLOCATION_ENV] == "greedy" and env_greedy[SERVE_ACTIVATION_SPARSITY_ENV] == "0.5"
    assert SERVE_ALLOCATION_ENV not in env_uniform and env_uniform[SERVE_ACTIVATION_SPARSITY_ENV] == "0.4"


def test_serve_refuses_greedy_without_a_table_or_above_it(bitmask_ckpt, greedy_ckpt):
    cases = [((str(bitmask_ckpt), "--allocation", "greedy"), None, "has no allocation table"),
             ((str(greedy_ckpt), "--allocation", "greedy", "--activation-sparsity", "0.8"), None,
              "covers average p_x up to 0.7"),
             ((str(greedy_ckpt), "--allocation", "best"), None, "invalid choice: 'best'"),
             ((str(greedy_ckpt),), {SERVE_ALLOCATION_ENV: "best"}, "is not one of uniform, greedy")]
    for args, env, message in cases:
        proc = subprocess.run([sys.executable, "-m", "duoserve.cli", "serve", *args, "--port", "0"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        assert "starting vLLM" not in proc.stderr, args


def test_the_table_is_metadata_only(bitmask_ckpt, greedy_ckpt):
    """allocate changes config.json (and the manifest) only: every tensor is the same."""
    a, b = load_checkpoint(bitmask_ckpt), load_checkpoint(greedy_ckpt)
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all((a.state_dict[k] == b.state_dict[k]).all() for k in a.state_dict)
    assert a.thresholds == b.thresholds
    cfg = json.loads((greedy_ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["activation_sparsity"]["allocation"]["targets"] == [0.3, 0.5, 0.7]


@pytest.mark.vllm
def test_served_greedy_gives_the_in_process_greedy_tokens(greedy_ckpt, tmp_path):
    """One server (float32, where vLLM and transformers agree token for token) at average 0.4 with
    --allocation greedy: its greedy tokens are the in-process greedy allocation's, not uniform's."""
    import torch

    from duoserve.prune.pruned_models import load_pruned_model
    from serving_helpers import served_greedy_tokens

    log = tmp_path / "vllm.log"
    served = served_greedy_tokens(["--activation-sparsity", "0.4", "--allocation", "greedy"], greedy_ckpt, log)
    assert "p_x=0.4 on average (greedy allocation" in log.read_text(errors="replace")
    greedy, tokenizer, _ = load_pruned_model(greedy_ckpt, activation_sparsity=0.4, allocation="greedy")
    uniform, _, _ = load_pruned_model(greedy_ckpt, activation_sparsity=0.4)
    differs = 0
    for text, tokens in served.items():
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                  pad_token_id=tokenizer.pad_token_id)
        assert tokens == greedy.generate(ids, **kw)[0, ids.shape[1]:].tolist(), text
        differs += uniform.generate(ids, **kw)[0, ids.shape[1]:].tolist() != tokens
    assert differs >= 1, "greedy at 0.4 gave the uniform rule's tokens for every prompt: the option did nothing"
