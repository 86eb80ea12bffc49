"""duoserve prune --quantize: a tiny model pruned and quantized end to end, resumed, refused."""
import os
import subprocess
import sys

import pytest
import torch

from duoserve.errors import InputError
from duoserve.format.io import load_checkpoint
from duoserve.format.quant import codes_from_dense
from duoserve.format.schema import WeightQuant
from duoserve.prune.api import PruneConfig, prune_model

FAST = dict(nsamples=4, seqlen=64, threshold_nsamples=2, batch_size=2)


@pytest.mark.parametrize("method,sparsity,quantize,group,p_x", [
    ("sparsegpt", "0.5", "int4", 32, 0.0), ("duogpt", "0.5", "int4", None, 0.5), ("wanda", "0.5", "int8", 64, 0.0),
    ("magnitude", "0.5", "int4", 16, 0.0), ("sparsegpt", "0", "int4", 128, 0.0)])
def test_prune_and_quantize_end_to_end(tmp_path, tiny_llama_dir, method, sparsity, quantize, group, p_x):
    out = tmp_path / method
    summary = prune_model(PruneConfig(output=out, model=str(tiny_llama_dir), method=method, sparsity=sparsity,
                                      activation_sparsity=p_x, quantize=quantize, group_size=group, **FAST))
    ck = load_checkpoint(out)
    wq = WeightQuant(int(quantize[3:]), group or 128)
    assert ck.qconfig.format_version == 3 and ck.qconfig.weight_quant == wq
    assert summary["sparsity"] == pytest.approx(float(sparsity), abs=1e-6)  # rounding never zeroes a kept weight
    from safetensors import safe_open
    f = next(out.glob("duoserve-*.safetensors"))
    with safe_open(str(f), framework="pt") as h:
        for name, info in ck.qconfig.modules.items():
            w = ck.state_dict[name + ".weight"]
            assert int((w != 0).sum()) == info.nnz
            codes_from_dense(w, h.get_tensor(name + ".weight_scales"), wq, name)  # on the grid


def test_resume_keeps_the_scales(tmp_path, tiny_llama_dir):
    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "duoserve.cli", "prune", str(tiny_llama_dir), "-o", str(out), "--method",
            "sparsegpt", "--quantize", "int4", "--group-size", "32", "--nsamples", "4", "--seqlen", "64",
            "--threshold-nsamples", "2", "--batch-size", "2"]
    env = dict(os.environ, _DUOSERVE_TEST_FAULT_AFTER_LAYER="0")
    assert subprocess.run(args, env=env, capture_output=True).returncode != 0
    assert out.with_name("resumed.partial").exists()
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    whole = tmp_path / "whole"
    prune_model(PruneConfig(output=whole, model=str(tiny_llama_dir), method="sparsegpt", quantize="int4",
                            group_size=32, **FAST))
    a, b = load_checkpoint(out).state_dict, load_checkpoint(whole).state_dict
    for k in b:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kwargs,match", [
    (dict(quantize="int3"), "--quantize 'int3' is not int4 or int8"),
    (dict(quantize="int4", group_size=0), "--group-size 0: need a positive multiple of 8"),
    (dict(quantize="int4", group_size=-16), "--group-size -16"),
    (dict(quantize="int8", group_size=100), "--group-size 100"),
    (dict(group_size=128), "--group-size needs --quantize"),
    (dict(quantize="int4", weight_format="dense"), "only the bitmask weight format"),
])
def test_bad_quantize_arguments(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        PruneConfig(output=tmp_path / "x", **kwargs)


def test_cli_refuses_bad_quantize_before_loading(tmp_path, tiny_llama_dir, capsys):
    from duoserve.cli import main

    code = main(["prune", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--quantize", "int4", "--group-size", "12"])
    assert code == 2 and "--group-size 12" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_refined_method_is_rounded_after_the_refiner(tmp_path, tiny_llama_dir):
    # the refiner moves weights after the base's solve, so the base solves in float and the engine
    # rounds the refined result (RTN): still on the grid, sparsity still exact
    out = tmp_path / "refined"
    summary = prune_model(PruneConfig(output=out, model=str(tiny_llama_dir), method="sparsegpt", refine="dsnot",
                                      quantize="int4", group_size=32, **FAST))
    ck = load_checkpoint(out)
    assert ck.qconfig.weight_quant == WeightQuant(4, 32) and summary["sparsity"] == pytest.approx(0.5, abs=1e-6)
