"""prune -> checkpoint -> load, end to end on a tiny real model."""
import os
import subprocess
import sys

import pytest
import torch

from duoserve.format.io import load_checkpoint
from duoserve.prune.api import PruneConfig, prune_model
from duoserve.prune.pruned_models import load_pruned_model

FAST = dict(nsamples=4, seqlen=64, threshold_nsamples=2, batch_size=2)


@pytest.mark.parametrize("method,sparsity,expected", [("magnitude", "0.5", 0.5), ("wanda", "2:4", 0.5),
                                                       ("sparsegpt", "0.5", 0.5), ("duogpt", "4:8", 0.5)])
def test_methods_end_to_end(tmp_path, tiny_llama_dir, method, sparsity, expected):
    out = tmp_path / method
    summary = prune_model(PruneConfig(output=out, model=str(tiny_llama_dir), method=method, sparsity=sparsity,
                                      activation_sparsity=0.5 if method == "duogpt" else 0.0, **FAST))
    ck = load_checkpoint(out)
    assert summary["sparsity"] == pytest.approx(expected, abs=1e-6)
    for name, info in ck.qconfig.modules.items():
        w = ck.state_dict[name + ".weight"]
        assert int((w != 0).sum()) == info.nnz
        assert 1 - info.nnz / w.numel() == pytest.approx(expected, abs=1e-6)
    assert ck.qconfig.producer["method"] == method
    assert (out / "duoserve-prune-log.json").is_file()
    assert not out.with_name(out.name + ".partial").exists()


def test_loaded_model_has_exactly_the_pruned_weights(tmp_path, tiny_llama_dir):
    out = tmp_path / "sgpt"
    prune_model(PruneConfig(output=out, model=str(tiny_llama_dir), method="sparsegpt", activation_sparsity=0.5, **FAST))
    ck = load_checkpoint(out)
    model, tokenizer, _ = load_pruned_model(out, dtype="bfloat16")
    state = model.state_dict()
    for name, tensor in ck.state_dict.items():
        assert torch.equal(state[name], tensor), name
    assert model.duoserve_sparsity.mode == "threshold"


def test_dense_format_loads_in_plain_transformers(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    prune_model(PruneConfig(output=out, model=str(tiny_llama_dir), method="wanda", weight_format="dense", **FAST))
    ck = load_checkpoint(out)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    for name, tensor in ck.state_dict.items():
        assert torch.equal(plain[name], tensor), name


def test_thresholds_realize_the_target_on_held_out_text(tmp_path, tiny_llama_dir):
    from duoserve.evaluation.perplexity import make_windows, perplexity
    from duoserve.evaluation.texts import evaluation_tokens

    out = tmp_path / "duo"
    prune_model(PruneConfig(output=out, model=str(tiny_llama_dir), method="duogpt", activation_sparsity=0.5,
                            nsamples=4, seqlen=64, threshold_nsamples=8, batch_size=2))
    ck = load_checkpoint(out)
    assert all(t > 0 for t in ck.thresholds.values())
    model, tokenizer, _ = load_pruned_model(out)
    ids, _ = evaluation_tokens("wiki", tokenizer)  # held out: Wikipedia, not the C4 calibration text
    result = perplexity(model, make_windows(ids, 64, max_windows=8))
    realized = model.duoserve_sparsity.realized()
    assert len(realized) == len(ck.thresholds)
    for name, value in realized.items():
        assert abs(value - 0.5) < 0.1, (name, value)
    assert torch.isfinite(torch.tensor(result["ppl"]))


def _prune_cli(model, out, env=None, *extra):
    cmd = [sys.executable, "-m", "duoserve.cli", "prune", str(model), "--method", "duogpt", "--activation-sparsity",
           "0.5", "--nsamples", "4", "--seqlen", "64", "--threshold-nsamples", "2", "--batch-size", "2", "-o", str(out),
           *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def test_killed_prune_resumes_to_the_same_checkpoint(tmp_path):
    from tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny3", num_layers=3)
    killed = _prune_cli(model, tmp_path / "resumed", {"_DUOSERVE_TEST_FAULT_AFTER_LAYER": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "resumed").exists()
    partial = tmp_path / "resumed.partial"
    assert (partial / "layers" / "layer-00001.safetensors").is_file()

    refused = _prune_cli(model, tmp_path / "resumed")
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = _prune_cli(model, tmp_path / "resumed", None, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    full = _prune_cli(model, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]

    a, b = load_checkpoint(tmp_path / "resumed"), load_checkpoint(tmp_path / "full")
    assert a.state_dict.keys() == b.state_dict.keys()
    for name in a.state_dict:
        assert torch.equal(a.state_dict[name], b.state_dict[name]), name
    assert a.thresholds == b.thresholds
    assert a.qconfig.modules == b.qconfig.modules
    assert not partial.exists()


def test_resume_with_other_settings_is_refused(tmp_path):
    from tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path / "tiny2", num_layers=2)
    killed = _prune_cli(model, tmp_path / "out", {"_DUOSERVE_TEST_FAULT_AFTER_LAYER": "0"})
    assert killed.returncode == -9
    other = _prune_cli(model, tmp_path / "out", None, "--resume", "--seed", "1")
    assert other.returncode == 2 and "different settings (seed)" in other.stderr
