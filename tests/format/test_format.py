"""Checkpoint format v1: bit-exact round trip and every rejection the format spec lists."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from duoserve.errors import CheckpointError, InputError
from duoserve.format import QuantizationConfig
from duoserve.format.bitmask import decode_bitmask, encode_bitmask
from duoserve.format.io import build_quant_config, load_checkpoint, save_checkpoint
from duoserve.format.manifest import write_manifest

Q = "model.layers.0.self_attn.q_proj"


def sparse_weight(shape, p=0.5, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    w[torch.rand(shape, generator=g) < p] = 0
    return w


@pytest.mark.parametrize("shape", [(1, 1), (3, 13), (33, 8), (7, 971)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bitmask_roundtrip(shape, dtype):
    w = sparse_weight(shape, dtype=dtype)
    bitmask, values = encode_bitmask(w)
    assert bitmask.shape == (shape[0], (shape[1] + 7) // 8) and bitmask.dtype == torch.uint8
    assert values.numel() == int((w != 0).sum())
    assert torch.equal(decode_bitmask(bitmask, values, shape), w)


def write(tmp_path, fmt="bitmask", thresholds=None, name="ck"):
    sd = {Q + ".weight": sparse_weight((64, 96)), "model.norm.weight": torch.ones(96, dtype=torch.bfloat16)}
    base = QuantizationConfig(weight_format=fmt, dtype="bfloat16", modules={})
    q = build_quant_config(sd, thresholds or {Q: 0.125}, base)
    return save_checkpoint(tmp_path / name, sd, {"model_type": "llama"}, q), sd


@pytest.mark.parametrize("fmt", ["bitmask", "dense"])
def test_roundtrip_bit_exact(tmp_path, fmt):
    path, sd = write(tmp_path, fmt)
    ck = load_checkpoint(path)
    for k, v in sd.items():
        assert torch.equal(ck.state_dict[k], v) and ck.state_dict[k].dtype == v.dtype
    assert ck.thresholds == {Q: 0.125}


def test_bitmask_is_about_half_the_bytes(tmp_path):
    path, _ = write(tmp_path, "bitmask", name="b")
    dense, _ = write(tmp_path, "dense", name="d")
    b = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    d = sum(f.stat().st_size for f in dense.glob("*.safetensors"))
    assert b < 0.65 * d


def test_existing_output_refused(tmp_path):
    write(tmp_path)
    with pytest.raises(InputError, match="already exists"):
        write(tmp_path)


def _weights_file(path):
    return next(path.glob("*.safetensors"))


def test_hash_mismatch(tmp_path):
    path, _ = write(tmp_path)
    f = _weights_file(path)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_truncated_safetensors(tmp_path):
    path, _ = write(tmp_path)
    f = _weights_file(path)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="truncated|corrupted"):
        load_checkpoint(path, verify=False)


def _rewrite(path, mutate):
    f = _weights_file(path)
    tensors = load_file(str(f))
    mutate(tensors)
    save_file(tensors, str(f))
    write_manifest(path)  # a consistent manifest, so the tensor check itself must catch it


def test_missing_tensor(tmp_path):
    path, _ = write(tmp_path)
    _rewrite(path, lambda t: t.pop(Q + ".weight_values"))
    with pytest.raises(CheckpointError, match=f"{Q}.weight_values is missing"):
        load_checkpoint(path)


def test_unexpected_tensor(tmp_path):
    path, _ = write(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("model.layers.9.mlp.up_proj.act_threshold", torch.tensor(0.0)))
    with pytest.raises(CheckpointError, match="up_proj.act_threshold belongs to no module"):
        load_checkpoint(path)


def test_shape_mismatch(tmp_path):
    path, _ = write(tmp_path)
    _rewrite(path, lambda t: t.__setitem__(Q + ".weight_bitmask", t[Q + ".weight_bitmask"][:-1]))
    with pytest.raises(CheckpointError, match="weight_bitmask: shape"):
        load_checkpoint(path)


@pytest.mark.parametrize("value,match", [(float("nan"), "NaN"), (-1.0, "negative")])
def test_bad_threshold(tmp_path, value, match):
    path, _ = write(tmp_path)
    _rewrite(path, lambda t: t.__setitem__(Q + ".act_threshold", torch.tensor(value)))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize("field,value,match", [("format_version", 99, "format_version 99 is not supported"),
                                               ("weight_format", "zip", "weight_format"),
                                               ("quant_method", "gptq", "quant_method")])
def test_bad_metadata(tmp_path, field, value, match):
    path, _ = write(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    write_manifest(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_manifest_file(tmp_path):
    path, _ = write(tmp_path)
    (path / "README.md").unlink()
    with pytest.raises(CheckpointError, match="listed in the manifest but missing"):
        load_checkpoint(path)


def test_plain_transformers_refuses_bitmask(tmp_path, tiny_llama_dir):
    """A bitmask checkpoint must fail loudly in plain transformers, never load random weights."""
    from transformers import AutoModelForCausalLM

    from duoserve.prune.api import PruneConfig, prune_model

    out = tmp_path / "tiny-bitmask"
    prune_model(PruneConfig(output=out, model=str(tiny_llama_dir), method="magnitude"))
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)


def test_is_duoserve_checkpoint_reads_only_the_quant_method(tmp_path):
    from duoserve.format.schema import is_duoserve_checkpoint

    assert not is_duoserve_checkpoint(tmp_path)  # no config.json
    cfg = tmp_path / "config.json"
    for text, expected in (("{not json", False), ('{"model_type": "llama"}', False),
                           ('{"quantization_config": "oops"}', False),
                           ('{"quantization_config": {"quant_method": "gptq"}}', False),
                           ('{"quantization_config": {"quant_method": "duoserve"}}', True)):
        cfg.write_text(text)
        assert is_duoserve_checkpoint(tmp_path) is expected, text


@pytest.mark.parametrize("fmt", ["bitmask", "dense"])
def test_the_writer_writes_exactly_the_format_spec(tmp_path, fmt):
    """module_tensor_specs is the one description of a module's tensors that the readers (format
    io, the serve-time validator, the vLLM linear method) check against: what the writer writes
    must be exactly it."""
    from duoserve.format.io import read_quant_config
    from duoserve.format.schema import module_tensor_specs

    path, _ = write(tmp_path, fmt)
    _, q = read_quant_config(path)
    info = q.modules[Q]
    tensors = {k: v for f in path.glob("*.safetensors") for k, v in load_file(str(f)).items() if k.startswith(Q)}
    specs = module_tensor_specs(fmt, info.shape, info.nnz)
    assert set(tensors) == {Q + s.suffix for s in specs}
    for s in specs:
        t = tensors[Q + s.suffix]
        assert tuple(t.shape) == s.shape, s
        assert (t.dtype == torch.uint8) == (s.dtype == "U8") and (s.dtype != "F32" or t.dtype == torch.float32)
    with pytest.raises(CheckpointError, match="weight_format 'sparse' is not one of bitmask, dense"):
        module_tensor_specs("sparse", (2, 2), 1)
