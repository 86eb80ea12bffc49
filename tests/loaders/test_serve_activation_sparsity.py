"""`duoserve serve CKPT --activation-sparsity P`: the same weights served at another p_x.

In this process: the vLLM linear layers take their thresholds from the checkpoint's grid when
DUOSERVE_ACTIVATION_SPARSITY (what the launcher sets for every vLLM process) asks for another p_x,
keep the loaded tensors bit for bit at the calibrated p_x, and a format-1 checkpoint still loads.
Bad values end `duoserve serve` with exit code 2 before vLLM starts. One server (float32, where
vLLM and transformers agree token for token; test_serve_vllm_entry.py) at p_x 0.33, between grid
points, must produce the in-process reference's greedy tokens at 0.33.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_versions import as_format_v1
from duoserve.errors import InputError
from duoserve.format.io import load_checkpoint
from duoserve.format.thresholds import SERVE_ACTIVATION_SPARSITY_ENV, select_thresholds

pytestmark = pytest.mark.timeout(600)
QKV = [("model.layers.1.self_attn.q_proj", "q"), ("model.layers.1.self_attn.k_proj", "k"),
       ("model.layers.1.self_attn.v_proj", "v")]
DOWN = [("model.layers.1.mlp.down_proj", None)]


def _served_layer(ckpt, shards, monkeypatch, p_x=None):
    """A vLLM layer built, loaded and packed the way vLLM does it, under the given serve-time p_x."""
    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear

    from duoserve.loaders.config import DuoserveConfig

    if p_x is None:
        monkeypatch.delenv(SERVE_ACTIVATION_SPARSITY_ENV, raising=False)
    else:
        monkeypatch.setenv(SERVE_ACTIVATION_SPARSITY_ENV, str(p_x))
    cfg = DuoserveConfig.from_config(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    cfg.packed_modules_mapping.update({"qkv_proj": ["q_proj", "k_proj", "v_proj"]})
    if shards is QKV:
        layer = QKVParallelLinear(128, 64, 2, 1, bias=False, quant_config=cfg, params_dtype=torch.float32,
                                  prefix="model.layers.1.self_attn.qkv_proj")
    else:
        layer = RowParallelLinear(256, 128, bias=False, quant_config=cfg, params_dtype=torch.float32,
                                  prefix="model.layers.1.mlp.down_proj")
    tensors = {k: v for f in ckpt.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    for hf, sid in shards:
        for name, t in tensors.items():
            if name.startswith(hf + "."):
                param = getattr(layer, name[len(hf) + 1:])
                param.weight_loader(param, t) if sid is None else param.weight_loader(param, t, sid)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def _check_layer(layer, ckpt, shards, thresholds):
    """The packed thresholds are `thresholds` bit for bit and the output is the serving rule with them."""
    loaded = load_checkpoint(ckpt)
    packed = [float(getattr(layer, f"duoserve_g{j}_threshold")) for j in range(len(layer.quant_method.groups))]
    assert sorted(set(packed)) == sorted({thresholds[hf] for hf, _ in shards})
    k = layer.input_size
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(0))
    ref = torch.cat([torch.where(x.abs() > thresholds[hf], x, 0.0) @ loaded.state_dict[hf + ".weight"].float().t()
                     for hf, _ in shards], -1)
    torch.testing.assert_close(layer(x)[0], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("shards", [QKV, DOWN], ids=["qkv_proj", "down_proj"])
@pytest.mark.parametrize("p_x", [0.33, 0.75, 0.0])
def test_vllm_layer_serves_the_grid_thresholds(vllm_layers, bitmask_ckpt, monkeypatch, shards, p_x):
    q = load_checkpoint(bitmask_ckpt).qconfig
    layer = _served_layer(bitmask_ckpt, shards, monkeypatch, p_x)
    _check_layer(layer, bitmask_ckpt, shards, select_thresholds(q, p_x))


def test_vllm_layer_at_the_calibrated_p_x_keeps_the_loaded_tensors(vllm_layers, bitmask_ckpt, monkeypatch):
    layer = _served_layer(bitmask_ckpt, DOWN, monkeypatch, 0.5)
    assert layer.quant_method.serve_thresholds is None  # the act_threshold tensor itself, not the metadata
    _check_layer(layer, bitmask_ckpt, DOWN, load_checkpoint(bitmask_ckpt).thresholds)


def test_format_v1_checkpoint_loads_in_vllm_layers(vllm_layers, bitmask_ckpt, tmp_path, monkeypatch):
    v1 = as_format_v1(bitmask_ckpt, tmp_path / "v1")
    for shards in (QKV, DOWN):
        _check_layer(_served_layer(v1, shards, monkeypatch), v1, shards, load_checkpoint(v1).thresholds)
    _check_layer(_served_layer(v1, DOWN, monkeypatch, 0.5), v1, DOWN, load_checkpoint(v1).thresholds)
    with pytest.raises(InputError, match="no threshold grid"):
        _served_layer(v1, DOWN, monkeypatch, 0.3)


def _serve(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "duoserve.cli", "serve", *args, "--port", "0"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_serve_refuses_bad_activation_sparsity_before_vllm_starts(bitmask_ckpt, tiny_llama_dir, tmp_path):
    v1 = as_format_v1(bitmask_ckpt, tmp_path / "v1")
    cases = [((str(bitmask_ckpt), "--activation-sparsity", "1"), None, r"outside [0, 1)"),
             ((str(bitmask_ckpt), "--activation-sparsity", "0.95"), None, "above the largest calibrated p_x 0.9"),
             ((str(bitmask_ckpt), "--activation-sparsity", "half"), None, "invalid float value: 'half'"),
             ((str(bitmask_ckpt),), {SERVE_ACTIVATION_SPARSITY_ENV: "half"}, "is not a number"),
             ((str(v1), "--activation-sparsity", "0.3"), None, "(format v1) has no threshold grid"),
             ((str(tiny_llama_dir), "--activation-sparsity", "0.3"), None, "is not a duoserve checkpoint")]
    for args, env, message in cases:
        proc = _serve(*args, env=env)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        assert "starting vLLM" not in proc.stderr, args


@pytest.mark.vllm
def test_served_at_another_p_x_gives_the_reference_tokens(bitmask_ckpt, tmp_path):
    """The one server of this module: --activation-sparsity 0.33 (interpolated) through the real CLI."""
    from duoserve.prune.pruned_models import load_pruned_model
    from serving_helpers import served_greedy_tokens

    log = tmp_path / "vllm.log"
    served = served_greedy_tokens(["--activation-sparsity", "0.33"], bitmask_ckpt, log)
    assert "serving at activation sparsity p_x=0.33 (interpolated" in log.read_text(errors="replace")
    at_033, tokenizer, _ = load_pruned_model(bitmask_ckpt, activation_sparsity=0.33)
    default, _, _ = load_pruned_model(bitmask_ckpt)
    differs = 0
    for text, tokens in served.items():
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        want = at_033.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                               min_new_tokens=12, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert tokens == want, f"{text!r}: served {tokens} != in-process at p_x 0.33 {want}"
        calibrated = default.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                      min_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        differs += calibrated[0, ids.shape[1]:].tolist() != tokens
    assert differs >= 1, "p_x 0.33 gave the calibrated p_x 0.5's tokens for every prompt: the option did nothing"
