"""The duoserve linear method inside real vLLM layers, in this process (no engine, no server).

Tensors are fed the way vLLM's loader feeds them: through each parameter's weight_loader, with
shard ids 'q'/'k'/'v' (QKVParallelLinear) and 0/1 (MergedColumnParallelLinear), none for the rest.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from duoserve.errors import CheckpointError
from duoserve.format.io import load_checkpoint

pytestmark = pytest.mark.timeout(300)

SHARDS = {"qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
          "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)]}
MAPPING = {k: [n for n, _ in v] for k, v in SHARDS.items()}


def _config(ckpt):
    from duoserve.loaders.config import DuoserveConfig

    import json
    cfg = DuoserveConfig.from_config(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    cfg.packed_modules_mapping.update(MAPPING)  # what the model class does in vLLM
    return cfg


def _layer(kind: str, cfg, dtype=torch.bfloat16, layer_idx: int = 0):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    if kind == "qkv_proj":  # tiny Llama: hidden 128, 2 heads of 64, 1 KV head
        return QKVParallelLinear(128, 64, 2, 1, bias=False, quant_config=cfg, params_dtype=dtype,
                                 prefix=f"model.layers.{layer_idx}.self_attn.qkv_proj")
    if kind == "gate_up_proj":
        return MergedColumnParallelLinear(128, [256, 256], bias=False, quant_config=cfg, params_dtype=dtype,
                                          prefix=f"model.layers.{layer_idx}.mlp.gate_up_proj")
    return RowParallelLinear(256, 128, bias=False, quant_config=cfg, params_dtype=dtype,
                             prefix=f"model.layers.{layer_idx}.mlp.down_proj")


def _hf_names(kind: str, layer_idx: int = 0):
    parent = f"model.layers.{layer_idx}.{'self_attn' if kind == 'qkv_proj' else 'mlp'}"
    return [(f"{parent}.{n}", sid) for n, sid in SHARDS.get(kind, [("down_proj", None)])]


def _load(layer, kind, tensors, skip=()):
    """Feed the checkpoint tensors of this layer to its parameters, as vLLM's loader does."""
    for hf, sid in _hf_names(kind):
        for name, t in tensors.items():
            if not name.startswith(hf + ".") or name in skip:
                continue
            param = getattr(layer, name[len(hf) + 1:])
            if sid is None:
                param.weight_loader(param, t)
            else:
                param.weight_loader(param, t, sid)


def _loaded_layer(ckpt, kind: str, dtype):
    """A vLLM layer of `kind` built for ckpt's config with duoserve's linear method, its shards loaded
    from ckpt's files and processed as after loading -> (layer, the checkpoint's tensors)."""
    layer = _layer(kind, _config(ckpt), dtype)
    assert type(layer.quant_method).__name__ == "DuoserveLinearMethod"
    tensors = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    _load(layer, kind, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, tensors


def _reference(kind, loaded, x):
    outs = []
    for hf, _ in _hf_names(kind):
        w = loaded.state_dict[hf + ".weight"].float()  # [N_s, K]
        t = loaded.thresholds[hf]
        xm = torch.where(x.abs() > t, x, torch.zeros_like(x)).float()  # the serving rule, exactly
        outs.append(xm @ w.t())
    return torch.cat(outs, -1)


@pytest.mark.parametrize("fmt", ["bitmask", "dense"])
@pytest.mark.parametrize("kind", ["qkv_proj", "gate_up_proj", "down_proj"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_matches_reference(vllm_layers, bitmask_ckpt, dense_ckpt, fmt, kind, dtype):
    ckpt = bitmask_ckpt if fmt == "bitmask" else dense_ckpt
    layer, tensors = _loaded_layer(ckpt, kind, dtype)
    names = {n for n, _ in layer.named_parameters()}
    assert not names & {"weight", "weight_bitmask", "weight_values", "act_threshold"}, "on-disk form not freed"
    assert any(n.endswith("_bitmap") for n in names)
    loaded = load_checkpoint(ckpt)
    torch.manual_seed(0)
    k = 256 if kind == "down_proj" else 128
    for tokens in (1, 7, 40):  # decode, small prefill, above the CPU kernel's sparse cutover
        x = torch.randn(tokens, k).to(dtype)
        y, _ = layer(x)
        ref = _reference(kind, loaded, x)
        assert y.dtype == dtype and y.shape == ref.shape
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_bitmask_layer_memory_is_about_half(vllm_layers, bitmask_ckpt):
    layer = _layer("gate_up_proj", _config(bitmask_ckpt))
    tensors = {k: v for f in bitmask_ckpt.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    _load(layer, "gate_up_proj", tensors)
    layer.quant_method.process_weights_after_loading(layer)
    dense_bytes = 512 * 128 * 2
    assert layer.duoserve_nbytes < 0.7 * dense_bytes, layer.duoserve_nbytes


def _op_calls(layer, x) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x)
    return sum(e.count for e in prof.key_averages() if e.key == "duoserve::dual_sparse_linear")


def test_apply_runs_the_custom_op_once_for_equal_thresholds(vllm_layers, bitmask_ckpt):
    tensors = _bitmask_tensors(bitmask_ckpt)
    q_thr = [tensors[f"model.layers.0.self_attn.{p}_proj.act_threshold"] for p in "qkv"]
    assert q_thr[0] == q_thr[1] == q_thr[2]  # the calibration measures the shared input
    layer = _layer("qkv_proj", _config(bitmask_ckpt))
    _load(layer, "qkv_proj", tensors)
    layer.quant_method.process_weights_after_loading(layer)
    assert _op_calls(layer, torch.randn(1, 128).bfloat16()) == 1


def test_different_shard_thresholds_stay_exact(vllm_layers, bitmask_ckpt):
    """Thresholds that differ per shard: one op call each, outputs concatenated, still exact."""
    tensors = _bitmask_tensors(bitmask_ckpt)
    base = float(tensors["model.layers.0.self_attn.q_proj.act_threshold"])
    for p, scale in zip("kv", (0.5, 1.5)):
        tensors[f"model.layers.0.self_attn.{p}_proj.act_threshold"] = torch.tensor(base * scale)
    layer = _layer("qkv_proj", _config(bitmask_ckpt), torch.float32)
    _load(layer, "qkv_proj", tensors)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(5, 128)
    assert _op_calls(layer, x) == 3
    loaded = load_checkpoint(bitmask_ckpt)
    for p, scale in zip("kv", (0.5, 1.5)):
        loaded.thresholds[f"model.layers.0.self_attn.{p}_proj"] = float(torch.tensor(base * scale))
    ref = _reference("qkv_proj", loaded, x)
    torch.testing.assert_close(layer(x)[0], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _bitmask_tensors(ckpt):
    return {k: v for f in ckpt.glob("*.safetensors") for k, v in load_file(str(f)).items()}


def test_missing_shard_is_named(vllm_layers, bitmask_ckpt):
    layer = _layer("qkv_proj", _config(bitmask_ckpt))
    _load(layer, "qkv_proj", _bitmask_tensors(bitmask_ckpt), skip={"model.layers.0.self_attn.k_proj.weight_values"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight_values is missing"):
        layer.quant_method.process_weights_after_loading(layer)


def test_missing_threshold_stays_nan_and_is_refused(vllm_layers, bitmask_ckpt):
    layer = _layer("gate_up_proj", _config(bitmask_ckpt))
    _load(layer, "gate_up_proj", _bitmask_tensors(bitmask_ckpt), skip={"model.layers.0.mlp.up_proj.act_threshold"})
    assert math.isnan(float(layer.act_threshold[1])) and not math.isnan(float(layer.act_threshold[0]))
    with pytest.raises(CheckpointError, match=r"up_proj\.act_threshold is missing"):
        layer.quant_method.process_weights_after_loading(layer)


def test_nan_threshold_in_checkpoint_is_refused(vllm_layers, bitmask_ckpt):
    layer = _layer("down_proj", _config(bitmask_ckpt))
    tensors = _bitmask_tensors(bitmask_ckpt)
    tensors["model.layers.0.mlp.down_proj.act_threshold"] = torch.tensor(float("nan"))
    _load(layer, "down_proj", tensors)
    with pytest.raises(CheckpointError, match=r"down_proj\.act_threshold is nan after loading"):
        layer.quant_method.process_weights_after_loading(layer)


def test_shape_mismatch_is_named(vllm_layers, bitmask_ckpt):
    layer = _layer("qkv_proj", _config(bitmask_ckpt))
    tensors = _bitmask_tensors(bitmask_ckpt)
    name = "model.layers.0.self_attn.v_proj.weight_values"
    tensors[name] = tensors[name][:-3]
    with pytest.raises(CheckpointError, match=r"v_proj\.weight_values: shape \[\d+\] in the checkpoint, expected"):
        _load(layer, "qkv_proj", tensors)


def test_corrupted_bitmask_is_refused(vllm_layers, bitmask_ckpt):
    layer = _layer("down_proj", _config(bitmask_ckpt))
    tensors = _bitmask_tensors(bitmask_ckpt)
    name = "model.layers.0.mlp.down_proj.weight_bitmask"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] ^= 0xFF  # popcount no longer matches nnz
    # Refused as soon as the shard's tensors are in (before a rank cuts its part of them).
    with pytest.raises(CheckpointError, match=r"down_proj\.weight_bitmask: \d+ bits set"):
        _load(layer, "down_proj", tensors)


def test_quant_method_per_layer(vllm_layers, bitmask_ckpt):
    from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    cfg = _config(bitmask_ckpt)
    assert cfg.get_quant_method(VocabParallelEmbedding(1024, 128), "model.embed_tokens") is None
    assert cfg.get_quant_method(ParallelLMHead(1024, 128), "lm_head") is None  # lm_head stays dense
    other = ReplicatedLinear(128, 128, bias=False, prefix="model.layers.0.mlp.router")
    assert isinstance(cfg.get_quant_method(other, "model.layers.0.mlp.router"), UnquantizedLinearMethod)
    partial = _config(bitmask_ckpt)
    partial.checkpoint_config.modules.pop("model.layers.1.self_attn.k_proj")
    with pytest.raises(CheckpointError, match="prune all of them or none"):
        _layer("qkv_proj", partial, layer_idx=1)


def test_unknown_format_version_is_refused():
    from duoserve.loaders.config import DuoserveConfig

    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        DuoserveConfig.from_config({"quant_method": "duoserve", "format_version": 99})


def test_plugin_registration_is_idempotent():
    from duoserve.loaders import plugin
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    plugin.register()
    plugin._done = False  # as in a fresh vLLM process that already imported us
    plugin.register()
    assert QUANTIZATION_METHODS.count("duoserve") == 1
    assert get_quantization_config("duoserve").__name__ == "DuoserveConfig"
