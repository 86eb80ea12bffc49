"""Quantized checkpoints (format 3, int4/int8 codes) in real vLLM layers through the duoserve
linear method: packed into the quantized kernel layout and run by duoserve::dual_sparse_linear_q."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from duoserve.format.bitmask import bitmask_to_bool
from duoserve.format.io import read_quant_config
from duoserve.format.quant import decode_quantized
from test_linear_method import _config, _hf_names, _layer, _load, _loaded_layer

pytestmark = pytest.mark.timeout(300)
FAST = dict(nsamples=4, seqlen=64, threshold_nsamples=2, batch_size=2)


@pytest.fixture(scope="module", params=[("int4", 32), ("int8", 64)], ids=["int4", "int8"])
def quant_ckpt(request, tiny_llama_dir, tmp_path_factory):
    from duoserve.prune.api import PruneConfig, prune_model

    quantize, group = request.param
    out = tmp_path_factory.mktemp("qckpt") / f"tiny-w50x50-{quantize}"
    prune_model(PruneConfig(output=out, model=str(tiny_llama_dir), method="magnitude", activation_sparsity=0.5,
                            quantize=quantize, group_size=group, **FAST))
    return out


def _dequantized_fp32(ckpt, tensors, hf):
    """The module's weight dequantized in fp32 (what the kernel multiplies), from the file."""
    _, q = read_quant_config(ckpt)
    info = q.modules[hf]
    mask = bitmask_to_bool(tensors[hf + ".weight_bitmask"], info.shape[1])
    return decode_quantized(mask, tensors[hf + ".weight_values"], tensors[hf + ".weight_scales"], q.weight_quant,
                            torch.float32)


@pytest.mark.parametrize("kind", ["qkv_proj", "gate_up_proj", "down_proj"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_layer_matches_the_dequantized_reference(vllm_layers, quant_ckpt, kind, dtype):
    layer, tensors = _loaded_layer(quant_ckpt, kind, dtype)
    names = {n for n, _ in layer.named_parameters()}
    assert not names & {"weight_bitmask", "weight_values", "weight_scales", "act_threshold"}, "on-disk form not freed"
    assert any(n.endswith("_codes") for n in names) and any(n.endswith("_scales") for n in names)
    assert layer.duoserve_nbytes / sum(_dequantized_fp32(quant_ckpt, tensors, hf).numel()
                                       for hf, _ in _hf_names(kind)) < 0.75
    torch.manual_seed(0)
    k = 256 if kind == "down_proj" else 128
    for tokens in (1, 7, 40):
        x = torch.randn(tokens, k).to(dtype)
        y, _ = layer(x)
        outs = []
        for hf, _ in _hf_names(kind):
            t = float(tensors[hf + ".act_threshold"])
            xm = torch.where(x.float().abs() > t, x.float(), 0.0)  # compared in fp32, as the kernels do
            outs.append(xm @ _dequantized_fp32(quant_ckpt, tensors, hf).t())
        ref = torch.cat(outs, -1)
        assert y.dtype == dtype and y.shape == ref.shape
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_scales_in_the_wrong_dtype_are_refused(vllm_layers, quant_ckpt):
    from duoserve.errors import CheckpointError

    cfg = _config(quant_ckpt)
    layer = _layer("down_proj", cfg)
    tensors = {k: v for f in sorted(quant_ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    hf = _hf_names("down_proj")[0][0]
    tensors[hf + ".weight_scales"] = tensors[hf + ".weight_scales"].float()
    with pytest.raises(CheckpointError, match="weight_scales: dtype torch.float32, expected torch.float16"):
        _load(layer, "down_proj", tensors)


def test_validator_accepts_it_and_inspect_shows_bytes_per_weight(quant_ckpt, capsys):
    import argparse

    from duoserve.inspect_cli import run
    from duoserve.loaders.validate import validate_checkpoint

    q = validate_checkpoint(quant_ckpt)
    assert q.format_version == 3 and q.weight_quant is not None
    run(argparse.Namespace(checkpoint=quant_ckpt, no_verify=False, json=None))
    out = capsys.readouterr().out
    assert "bytes per target weight" in out and f"{q.weight_quant.name} values" in out


@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_vllm_completes_a_request_on_a_quantized_checkpoint(quant_ckpt, tmp_path):
    """The whole load path in vLLM's engine (its weight loader, fused layers, the op under its model
    runner), in a fresh interpreter as tests/loaders/test_checkpoint_kinds_served.py runs the other kinds."""
    import json
    import os
    import subprocess
    import sys

    from test_checkpoint_kinds_served import _GENERATE

    script = tmp_path / "generate.py"
    script.write_text(_GENERATE)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONFAULTHANDLER": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, str(script), str(quant_ckpt)], capture_output=True, text=True, env=env,
                          timeout=540)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result and len(json.loads(result[-1][len("RESULT "):])["tokens"]) == 8, tail
    assert "dual_sparse_linear_q" in tail or "int4/int8 codes" in tail, "the load log names the quantized kernel"


@pytest.mark.parametrize("kind", ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])
def test_tensor_parallel_ranks_compute_their_share(vllm_layers, quant_ckpt, kind):
    """TP 2: column-parallel ranks hold their rows of codes and scales, row-parallel ranks their
    columns and whole groups; together they give the single-device result."""
    from test_tensor_parallel import SHARDS, _build, _feed

    tensors = {k: v for f in sorted(quant_ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    parent = f"model.layers.0.{'self_attn' if kind in ('qkv_proj', 'o_proj') else 'mlp'}"
    torch.manual_seed(1)
    single = _build(kind, quant_ckpt, 0, 1, torch.float32)
    _feed(single, kind, tensors)
    single.quant_method.process_weights_after_loading(single)
    x = torch.randn(5, single.input_size)
    whole = single.quant_method.apply(single, x)
    ref = []
    for hf, _ in SHARDS[kind]:
        t = float(tensors[f"{parent}.{hf}.act_threshold"])
        ref.append(torch.where(x.abs() > t, x, 0.0) @ _dequantized_fp32(quant_ckpt, tensors, f"{parent}.{hf}").t())
    torch.testing.assert_close(whole, torch.cat(ref, 1), rtol=1e-4, atol=1e-4 * whole.abs().max().item())
    outs = []
    for rank in range(2):
        layer = _build(kind, quant_ckpt, rank, 2, torch.float32)
        _feed(layer, kind, tensors)
        layer.quant_method.process_weights_after_loading(layer)
        outs.append(layer.quant_method.apply(layer, x.chunk(2, dim=1)[rank] if kind in ("o_proj", "down_proj") else x))
    if kind in ("o_proj", "down_proj"):
        torch.testing.assert_close(outs[0] + outs[1], whole, rtol=1e-4, atol=1e-4 * whole.abs().max().item())
    elif kind == "gate_up_proj":
        want = [torch.cat([r.chunk(2, 1)[rank] for r in ref], 1) for rank in range(2)]
        for got, w in zip(outs, want):
            torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


def test_a_tensor_parallel_cut_inside_a_group_is_refused(vllm_layers, quant_ckpt):
    from duoserve.errors import CheckpointError
    from duoserve.format.io import read_quant_config
    from duoserve.loaders.validate import tensor_parallel_problems
    from test_tensor_parallel import _build, _feed

    config, q = read_quant_config(quant_ckpt)
    tp = 128 // q.weight_quant.group_size * 2  # o_proj's 128 columns cut into pieces smaller than a group
    assert any("quantization groups" in p for p in tensor_parallel_problems(config, q, tp))
    tensors = {k: v for f in sorted(quant_ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    layer = _build("o_proj", quant_ckpt, 0, tp, torch.float32)
    with pytest.raises(CheckpointError, match="inside a quantization group"):
        _feed(layer, "o_proj", tensors)
