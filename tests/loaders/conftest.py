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


def kill_group(pid: int, grace: float = 15.0) -> None:
    """SIGTERM a process group, SIGKILL it after `grace` seconds (tests never leave servers behind)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class LineReader:
    """Collects a process's stdout lines in a background thread (no select on a buffered pipe)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, needle: str, timeout: float) -> str:
        """The first line containing `needle`; fail with the output on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.5)
        tail = "".join(self.lines[-40:])
        raise AssertionError(f"{needle!r} not seen within {timeout:.0f} s (exit code {self.proc.poll()}):\n{tail}")


@contextlib.contextmanager
def duoserve_cli(args: list[str], env: dict[str, str] | None = None):
    """`python -m duoserve.cli ARGS` in its own process group, stdout and stderr collected
    (unbuffered) by a LineReader: yields (proc, reader). On exit the command's group is killed, and
    the group of the vLLM server it started (the launcher logs "vLLM pid N" first), whatever state
    the command is in: tests never leave servers behind."""
    proc = subprocess.Popen([sys.executable, "-m", "duoserve.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    out = LineReader(proc)
    try:
        yield proc, out
    finally:
        kill_group(proc.pid)
        started = [re.search(r"vLLM pid (\d+)", line) for line in list(out.lines)]
        for m in filter(None, started):
            kill_group(int(m.group(1)), grace=5)
        if proc.stdout:
            proc.stdout.close()



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
