"""Checkpoint format 3: int4/int8 codes with per-group float16 scales (duoserve/format/quant.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from duoserve.errors import CheckpointError
from duoserve.format import QuantizationConfig
from duoserve.format.io import build_quant_config, load_checkpoint, save_checkpoint
from duoserve.format.manifest import write_manifest
from duoserve.format.quant import (
    codes_from_dense, expand_groups, group_scales, half_range, pack_codes, round_to_nearest, unpack_codes,
)
from duoserve.format.schema import WeightQuant, module_tensor_specs

Q = "model.layers.0.self_attn.q_proj"


def sparse_weight(shape, p=0.5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) < p] = 0
    return w.to(dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [8, 32, 128])
@pytest.mark.parametrize("shape", [(1, 8), (5, 13), (7, 971), (33, 256)])
def test_round_trip_error_is_at_most_half_a_step_per_group(bits, group, shape):
    w = sparse_weight(shape, seed=bits + group)
    q = WeightQuant(bits, group)
    deq, scales = round_to_nearest(w, q)
    assert scales.dtype == torch.float16 and scales.shape == (shape[0], q.groups(shape[1]))
    full = expand_groups(scales.float(), shape[1], group)
    kept = w != 0
    # every kept weight stays non-zero, every pruned one zero: the mask is exact
    assert torch.equal(deq != 0, kept)
    err = (deq - w).abs()
    # the largest |w| of a group sits inside the grid (scale rounded to fp16: within 2^-11 relative)
    assert bool((err[kept] <= 0.5 * full[kept] * (1 + 2 ** -9) + 1e-7).all())
    # and the grid spans the group: |level| <= half_range scales
    assert bool((deq.abs() <= half_range(bits) * full + 1e-7).all())


def test_all_zero_groups_get_the_smallest_scale_and_no_values():
    w = torch.zeros(3, 40)
    w[1, 20] = 0.5
    deq, scales = round_to_nearest(w, WeightQuant(4, 16))
    assert torch.equal(deq != 0, w != 0) and float(scales[0, 0]) == 2 ** -14
    assert float(deq[1, 20]) == pytest.approx(0.5, rel=2 ** -9)  # the group's max is the top level


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_codes_are_recovered_exactly_from_the_dequantized_weight_in_any_dtype(bits, dtype):
    w = sparse_weight((9, 200), seed=3) * 3
    q = WeightQuant(bits, 64)
    deq, scales = round_to_nearest(w, q)
    stored = deq.to(dtype)
    codes = codes_from_dense(stored, scales, q)
    assert codes.numel() == int((w != 0).sum()) and int(codes.min()) >= 0 and int(codes.max()) < 2 ** bits
    off = stored.clone()
    off[stored != 0] *= 1.01  # off the grid
    with pytest.raises(CheckpointError, match="not on its int"):
        codes_from_dense(off.to(dtype), scales, q)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64])
def test_int4_packs_two_codes_per_byte_low_nibble_first(n):
    codes = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes, 4)
    assert packed.numel() == (n + 1) // 2 and packed.dtype == torch.uint8
    if n >= 2:
        assert int(packed[0]) == int(codes[0]) | (int(codes[1]) << 4)
    assert torch.equal(unpack_codes(packed, n, 4).long(), codes.long())


@pytest.mark.parametrize("bad", [dict(bits=3), dict(bits=4, group_size=0), dict(bits=4, group_size=-8),
                                 dict(bits=8, group_size=12), dict(bits=4, scheme="asymmetric")])
def test_bad_quant_settings_are_refused(bad):
    with pytest.raises(CheckpointError, match="weight_quant"):
        WeightQuant(**bad)


def test_specs_of_a_quantized_module():
    specs = {s.suffix: s for s in module_tensor_specs("bitmask", (4, 300), 7, WeightQuant(4, 128))}
    assert specs[".weight_values"].shape == (4,) and specs[".weight_values"].dtype == "U8"
    assert specs[".weight_scales"].shape == (4, 3) and specs[".weight_scales"].dtype == "F16"
    with pytest.raises(CheckpointError, match="needs weight_format 'bitmask'"):
        module_tensor_specs("dense", (4, 300), 7, WeightQuant(4))


def write(tmp_path, bits=4, group=128, name="ck", shape=(64, 300), dtype=torch.bfloat16):
    w = sparse_weight(shape, seed=1)
    wq = WeightQuant(bits, group)
    deq, scales = round_to_nearest(w, wq)
    sd = {Q + ".weight": deq.to(dtype), "model.norm.weight": torch.ones(shape[1], dtype=dtype)}
    base = QuantizationConfig(weight_format="bitmask", dtype=str(dtype).replace("torch.", ""), modules={},
                              weight_quant=wq)
    q = build_quant_config(sd, {Q: 0.125}, base)
    return save_checkpoint(tmp_path / name, sd, {"model_type": "llama"}, q, quant_scales={Q: scales}), sd


@pytest.mark.parametrize("bits", [4, 8])
def test_checkpoint_round_trip_is_bit_exact_and_says_version_3(tmp_path, bits):
    path, sd = write(tmp_path, bits)
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q["format_version"] == 3 and q["weight_quant"] == {"bits": bits, "group_size": 128, "scheme": "symmetric",
                                                              "scale_dtype": "float16"}
    ck = load_checkpoint(path)
    for k, v in sd.items():
        assert torch.equal(ck.state_dict[k], v), k
    assert ck.qconfig.weight_quant == WeightQuant(bits, 128)


@pytest.mark.parametrize("bits,bar", [(4, 0.45), (8, 0.70)])
def test_on_disk_bytes_per_weight_at_half_sparsity(tmp_path, bits, bar):
    path, _ = write(tmp_path, bits, shape=(256, 1024))
    t = load_file(str(next(path.glob("*.safetensors"))))
    nbytes = sum(t[Q + s].numel() * t[Q + s].element_size() for s in (".weight_bitmask", ".weight_values",
                                                                       ".weight_scales"))
    assert nbytes / (256 * 1024) <= bar - 0.03  # the runtime layout adds its offsets (kernels' packer)


def test_unquantized_checkpoints_still_say_version_2(tmp_path):
    base = QuantizationConfig(weight_format="bitmask", dtype="bfloat16", modules={})
    assert base.format_version == 2 and "weight_quant" not in base.to_dict()


@pytest.mark.parametrize("edit,match", [
    (lambda q: q.update(format_version=2), "needs format_version 3"),
    (lambda q: q["weight_quant"].update(bits=2), "weight_quant.bits"),
    (lambda q: q["weight_quant"].update(group_size=100), "group_size 100"),
    (lambda q: q.update(weight_quant=[4]), "not a JSON object"),
])
def test_bad_metadata_is_refused(tmp_path, edit, match):
    path, _ = write(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))
    write_manifest(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def _rewrite(path, mutate):
    f = next(path.glob("*.safetensors"))
    tensors = load_file(str(f))
    mutate(tensors)
    save_file(tensors, str(f))
    write_manifest(path)


@pytest.mark.parametrize("mutate,match", [
    (lambda t: t.pop(Q + ".weight_scales"), "weight_scales is missing"),
    (lambda t: t.__setitem__(Q + ".weight_scales", t[Q + ".weight_scales"][:, :2].contiguous()), "shape"),
    (lambda t: t.__setitem__(Q + ".weight_scales", t[Q + ".weight_scales"].float()), "expected"),
    (lambda t: t[Q + ".weight_scales"].__setitem__((0, 0), float("nan")), "finite number > 0"),
    (lambda t: t.__setitem__(Q + ".weight_values", t[Q + ".weight_values"][:-1].contiguous()), "shape"),
    (lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight_scales", torch.ones(2, 2, dtype=torch.float16)),
     "belongs to no module"),
])
def test_bad_tensors_are_refused_with_their_name(tmp_path, mutate, match):
    path, _ = write(tmp_path)
    _rewrite(path, mutate)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_a_set_pad_nibble_is_refused(tmp_path):
    path, sd = write(tmp_path)
    nnz = int((sd[Q + ".weight"] != 0).sum())
    if nnz % 2 == 0:
        pytest.skip("even value count has no pad nibble")
    _rewrite(path, lambda t: t[Q + ".weight_values"].__setitem__(-1, t[Q + ".weight_values"][-1] | 0xF0))
    with pytest.raises(CheckpointError, match="high nibble"):
        load_checkpoint(path)


def test_writer_refuses_weights_off_the_grid(tmp_path):
    w = sparse_weight((8, 64)).to(torch.bfloat16)
    wq = WeightQuant(4, 32)
    _, scales = round_to_nearest(w.float(), wq)
    sd = {Q + ".weight": w}
    q = build_quant_config(sd, {Q: 0.0}, QuantizationConfig(weight_format="bitmask", dtype="bfloat16", modules={},
                                                            weight_quant=wq))
    with pytest.raises(CheckpointError, match="not on its int4 grid"):
        save_checkpoint(tmp_path / "x", sd, {"model_type": "llama"}, q, quant_scales={Q: scales})


def test_version_1_and_2_checkpoints_still_load(tmp_path):
    from checkpoint_versions import as_format_v1

    sd = {Q + ".weight": sparse_weight((64, 96), dtype=torch.bfloat16),
          "model.norm.weight": torch.ones(96, dtype=torch.bfloat16)}
    q = build_quant_config(sd, {Q: 0.125}, QuantizationConfig(weight_format="bitmask", dtype="bfloat16", modules={}))
    v2 = save_checkpoint(tmp_path / "v2", sd, {"model_type": "llama"}, q)
    v1 = as_format_v1(v2, tmp_path / "v1")
    for path, version in ((v2, 2), (v1, 1)):
        ck = load_checkpoint(path)
        assert ck.qconfig.format_version == version and ck.qconfig.weight_quant is None
        assert torch.equal(ck.state_dict[Q + ".weight"], sd[Q + ".weight"])
