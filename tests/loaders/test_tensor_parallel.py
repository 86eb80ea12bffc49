"""Tensor-parallel slicing of duoserve weights: the shard arithmetic alone (fast, no vLLM), and the
duoserve linear method inside real vLLM parallel layers built for TP = 2 and 4 in this process.

The layers are built with vLLM's tensor-parallel rank and size patched (no second process, no
all-reduce): each rank's layer is loaded from the whole checkpoint tensors, as vLLM's loader feeds
them on every rank, and its quant method's apply() is compared with the rank's share of the
single-device result (column-parallel: its output rows; row-parallel: its partial sum).
"""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file

from duoserve.format.bitmask import decode_bitmask, encode_bitmask
from duoserve.format.io import load_checkpoint
from duoserve.loaders.sharding import RankSlice, rank_slice, row_value_offsets, slice_bitmask, slice_dense

pytestmark = pytest.mark.timeout(300)


def _sparse(n: int, k: int, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    if n > 2 and k > 2:
        w[1] = 0  # an empty row
        w[:, 2] = 0  # an empty column
    return w


# N and K not multiples of 8 (bitmask bytes) nor of the kernel's 128-row block; a column block that
# starts mid-byte; sparsity 0 (dense), 0.5, 0.9 and 1 (no value at all).
SHAPES = [(6, 10), (30, 21), (42, 36), (130, 99)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_every_rank_slice_decodes_to_the_dense_slice(n, k, sparsity):
    w = _sparse(n, k, sparsity, seed=n * 1000 + k).bfloat16()  # [N, K]
    bitmask, values = encode_bitmask(w)
    offsets = row_value_offsets(bitmask)
    assert offsets[-1] == values.numel() and torch.equal(offsets[1:] - offsets[:-1], (w != 0).sum(1))
    for dim, size in ((0, n), (1, k)):
        for tp in [t for t in range(1, 7) if size % t == 0]:
            row_bm, col_vals = [], []
            for r in range(tp):
                local = (n // tp, k) if dim == 0 else (n, k // tp)
                sl = rank_slice((n, k), local, r if dim == 0 else 0, r if dim == 1 else 0)
                bm, vals = slice_bitmask(bitmask, values, (n, k), sl)
                assert bm.dtype == torch.uint8 and tuple(bm.shape) == (sl.shape[0], (sl.shape[1] + 7) // 8)
                got = decode_bitmask(bm, vals, sl.shape)
                want = w[sl.row_start:sl.row_end, sl.col_start:sl.col_end]
                assert torch.equal(got, want), (dim, tp, r)
                assert torch.equal(bm, encode_bitmask(want)[0]), "pad bits or byte alignment wrong"
                assert torch.equal(slice_dense(w, sl), want)
                row_bm.append(bm)
                col_vals.append(vals)
            # The ranks' parts together hold every non-zero exactly once (none replicated, none lost).
            assert sum(v.numel() for v in col_vals) == values.numel()
            if dim == 0:  # row blocks concatenate back to the unsharded encoding
                assert torch.equal(torch.cat(row_bm), bitmask) and torch.equal(torch.cat(col_vals), values)


def test_whole_slice_is_the_input_and_rows_are_a_value_range():
    w = _sparse(12, 16, 0.5, seed=1)
    bitmask, values = encode_bitmask(w)
    whole = rank_slice((12, 16), (12, 16), 0, 0)
    assert whole.is_whole((12, 16)) and slice_bitmask(bitmask, values, (12, 16), whole)[1] is values
    bm, vals = slice_bitmask(bitmask, values, (12, 16), RankSlice(4, 8, 0, 16))
    start = int((w[:4] != 0).sum())
    assert vals.data_ptr() == values[start:].data_ptr()  # a view: no per-value work for row blocks


@pytest.mark.parametrize("full,local,parts", [((12, 8), (5, 8), (0, 0)), ((12, 8), (6, 8), (2, 0)),
                                              ((12, 8), (12, 3), (0, 0)), ((12, 8), (12, 4), (0, 2))])
def test_rank_slice_refuses_sizes_that_do_not_split(full, local, parts):
    with pytest.raises(ValueError, match="does not split"):
        rank_slice(full, local, *parts)


# -- the linear method inside vLLM's parallel layers -------------------------------------------------------

SHARDS = {"qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
          "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
          "o_proj": [("o_proj", None)], "down_proj": [("down_proj", None)]}


@contextlib.contextmanager
def _as_rank(rank: int, size: int):
    """vLLM's tensor-parallel rank and size, as a layer built on that rank would see them."""
    import vllm.model_executor.layers.linear as linear

    saved = linear.get_tensor_model_parallel_rank, linear.get_tensor_model_parallel_world_size
    linear.get_tensor_model_parallel_rank, linear.get_tensor_model_parallel_world_size = (lambda: rank), (lambda: size)
    try:
        yield
    finally:
        linear.get_tensor_model_parallel_rank, linear.get_tensor_model_parallel_world_size = saved


def _config(ckpt):
    from duoserve.loaders.config import DuoserveConfig

    cfg = DuoserveConfig.from_config(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    cfg.packed_modules_mapping.update({k: [n for n, _ in v] for k, v in SHARDS.items() if len(v) > 1})
    return cfg


def _build(kind: str, ckpt, rank: int, size: int, dtype, cfg=None):
    """The vLLM layer `kind` of layer 0 of `ckpt`'s model, as tensor-parallel rank `rank` of `size` builds it."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    c = json.loads((ckpt / "config.json").read_text())
    hidden, inter, heads, kv = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                                c["num_key_value_heads"])
    cfg = cfg or _config(ckpt)
    prefix = f"model.layers.0.{'self_attn' if kind in ('qkv_proj', 'o_proj') else 'mlp'}.{kind}"
    with _as_rank(rank, size):
        if kind == "qkv_proj":
            return QKVParallelLinear(hidden, hidden // heads, heads, kv, bias=False, quant_config=cfg,
                                     params_dtype=dtype, prefix=prefix)
        if kind == "gate_up_proj":
            return MergedColumnParallelLinear(hidden, [inter, inter], bias=False, quant_config=cfg, params_dtype=dtype,
                                              prefix=prefix)
        k = hidden if kind == "o_proj" else inter
        return RowParallelLinear(k, hidden, bias=False, quant_config=cfg, params_dtype=dtype, prefix=prefix)


def _feed(layer, kind, tensors):
    parent = f"model.layers.0.{'self_attn' if kind in ('qkv_proj', 'o_proj') else 'mlp'}"
    for hf, sid in SHARDS[kind]:
        for name, t in tensors.items():
            if name.startswith(f"{parent}.{hf}."):
                param = getattr(layer, name.rsplit(".", 1)[1])
                param.weight_loader(param, t) if sid is None else param.weight_loader(param, t, sid)


def _shard_reference(kind, loaded, x):
    """Per shard: x thresholded with the shard's t, times the shard's dense weight [T, N_s] (fp32)."""
    parent = f"model.layers.0.{'self_attn' if kind in ('qkv_proj', 'o_proj') else 'mlp'}"
    out = []
    for hf, _ in SHARDS[kind]:
        w = loaded.state_dict[f"{parent}.{hf}.weight"].float()
        t = loaded.thresholds[f"{parent}.{hf}"]
        out.append(torch.where(x.abs() > t, x, torch.zeros_like(x)).float() @ w.t())
    return out


# (checkpoint fixture, TP): the tiny Llama (2 heads, 1 KV head: k/v replicated on both ranks at TP 2),
# the GQA one (4 heads, 2 KV heads: k/v split at TP 2, each KV head on 2 ranks at TP 4).
CASES = [("bitmask_ckpt", 2), ("dense_ckpt", 2), ("gqa_ckpt", 2), ("gqa_ckpt", 4)]


@pytest.mark.parametrize("kind", ["qkv_proj", "gate_up_proj", "o_proj", "down_proj"])
@pytest.mark.parametrize("ckpt_name,tp", CASES)
def test_ranks_of_a_parallel_layer_compute_their_share(vllm_layers, request, ckpt_name, tp, kind):
    """Column-parallel: rank r's output is its rows of each shard (k/v: its KV head, replicated on
    tp / num_kv_heads ranks as vLLM does); row-parallel: the ranks' partial sums add up to the
    single-device output. Each rank keeps only its part of the values."""
    ckpt = request.getfixturevalue(ckpt_name)
    tensors = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    loaded = load_checkpoint(ckpt)
    kv_heads = loaded.config["num_key_value_heads"]
    torch.manual_seed(tp)
    single = _build(kind, ckpt, 0, 1, torch.float32)
    x = torch.randn(5, single.input_size)  # [T, K] float32
    ref = _shard_reference(kind, loaded, x)  # per shard [T, N_s]
    outs, nbytes = [], []
    for rank in range(tp):
        layer = _build(kind, ckpt, rank, tp, torch.float32)
        _feed(layer, kind, tensors)
        layer.quant_method.process_weights_after_loading(layer)
        assert not {n for n, _ in layer.named_parameters()} & {"weight", "weight_bitmask", "weight_values"}
        x_rank = x.chunk(tp, dim=1)[rank] if kind in ("o_proj", "down_proj") else x
        outs.append(layer.quant_method.apply(layer, x_rank))
        nbytes.append(layer.duoserve_nbytes)
        if kind == "qkv_proj":
            q, k, v = ref
            replicas = max(tp // kv_heads, 1)
            assert layer.num_kv_head_replicas == replicas
            kv_part = rank // replicas  # vLLM's shard_rank for k/v
            want = torch.cat([q.chunk(tp, 1)[rank], k.chunk(tp // replicas, 1)[kv_part],
                              v.chunk(tp // replicas, 1)[kv_part]], 1)
        elif kind == "gate_up_proj":
            want = torch.cat([r.chunk(tp, 1)[rank] for r in ref], 1)
        else:
            continue
        torch.testing.assert_close(outs[-1], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    if kind in ("o_proj", "down_proj"):
        total = torch.stack(outs).sum(0)  # what vLLM's all-reduce adds up
        torch.testing.assert_close(total, ref[0], rtol=1e-4, atol=1e-4 * ref[0].abs().max().item())
    if kind != "qkv_proj":  # nothing replicated: each rank holds about 1/tp of the packed bytes
        _feed(single, kind, tensors)
        single.quant_method.process_weights_after_loading(single)
        assert max(nbytes) < 1.5 * single.duoserve_nbytes / tp, (nbytes, single.duoserve_nbytes)


def test_per_rank_thresholds_stay_per_shard(vllm_layers, bitmask_ckpt):
    """Shards with different thresholds keep them on every rank (one op call per shard)."""
    tensors = {k: v for f in bitmask_ckpt.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    base = float(tensors["model.layers.0.mlp.gate_proj.act_threshold"])
    tensors["model.layers.0.mlp.up_proj.act_threshold"] = torch.tensor(base * 0.5)
    for rank in range(2):
        layer = _build("gate_up_proj", bitmask_ckpt, rank, 2, torch.float32)
        _feed(layer, "gate_up_proj", tensors)
        layer.quant_method.process_weights_after_loading(layer)
        assert [g.threshold for g in layer.quant_method.groups] == [pytest.approx(base), pytest.approx(base * 0.5)]
        assert [(g.row_offset, g.rows) for g in layer.quant_method.groups] == [(0, 128), (128, 128)]


def test_a_checkpoint_of_another_shape_is_refused_per_rank(vllm_layers, bitmask_ckpt, gqa_ckpt):
    """The GQA model's layers at TP 2 with the tiny Llama's metadata: each rank's part would be a
    wrong-sized block of the tiny weights; refused by name before any tensor is read."""
    from duoserve.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"q_proj.*does not belong to this config"):
        _build("qkv_proj", gqa_ckpt, 0, 2, torch.float32, cfg=_config(bitmask_ckpt))
