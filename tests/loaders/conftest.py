"""Fixtures for the serving tests: checkpoints of the tiny Llama and vLLM servers (killed on teardown)."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from process_helpers import LineReader, duoserve_cli, kill_group  # noqa: E402,F401 (fixtures' helpers, re-exported)
from serving_helpers import as_dense_format, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def bitmask_ckpt(tiny_llama_dir, tmp_path_factory) -> Path:
    """`duoserve prune` of the tiny Llama: W 50% (magnitude) + X 50% (calibrated thresholds), bitmask."""
    return make_checkpoint(tiny_llama_dir, tmp_path_factory.mktemp("ckpt") / "tiny-w50x50-bitmask")


@pytest.fixture(scope="session")
def dense_ckpt(bitmask_ckpt, tmp_path_factory) -> Path:
    """The same checkpoint in the dense weight format (zeros in place)."""
    return as_dense_format(bitmask_ckpt, tmp_path_factory.mktemp("ckpt") / "tiny-w50x50-dense")


@pytest.fixture(scope="session")
def gqa_ckpt(tmp_path_factory) -> Path:
    """A tiny Llama whose attention splits over 2 ranks (4 heads of 64, 2 KV heads; hidden 256,
    intermediate 384 = 3 kernel row blocks), pruned as bitmask_ckpt is: the tensor-parallel tests."""
    from tiny_model import build_tiny_llama

    model = build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama-gqa", hidden_size=256,
                             intermediate_size=384, num_heads=4, num_kv_heads=2)
    return make_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny-gqa-w50x50-bitmask")


@pytest.fixture(scope="session")
def vllm_layers():
    """vLLM's distributed state (world size 1, gloo) and config context, to build its linear layers
    in this process without starting an engine."""
    from duoserve.loaders import plugin

    plugin.register()
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, "gloo")
        initialize_model_parallel(1, 1)
        yield
        destroy_model_parallel()
        destroy_distributed_environment()


@pytest.fixture
def recorded_launches(monkeypatch):
    """launch() records its vLLM command and environment instead of starting vLLM: [(cmd, env), ...]."""
    from duoserve.loaders import server

    calls = []

    class FakePopen:
        pid = 4242

        def __init__(self, cmd, env, **kwargs):
            calls.append((cmd, env))

        def poll(self):
            return 0

    monkeypatch.setattr(server.subprocess, "Popen", FakePopen)
    yield calls
    server._live.clear()
