"""How the CUDA backend picks a path per (shape, dtype, token bucket): the measured fastest, once;
and how the kernels read their integer settings (settings.env_int).

No GPU here: the timer is replaced by fixed times, and `_can_time` by True, so what is tested is
the choice and its caching, not the kernels (test_triton_interpret.py runs those)."""
import pytest
import torch

from duoserve.kernels import gpu
from duoserve.kernels.settings import env_int


@pytest.fixture
def timed(monkeypatch):
    """gpu with a fake timer: times[name] seconds per call; returns the list of timed names."""
    monkeypatch.setattr(gpu, "_path", {})
    monkeypatch.setattr(gpu, "_can_time", lambda device: True)
    timed_names = []

    def fake_time(call):
        name, seconds = call()
        timed_names.append(name)
        if seconds is None:
            raise RuntimeError(f"{name} does not compile here")
        return seconds

    monkeypatch.setattr(gpu, "_tune_time", fake_time)
    return timed_names


def candidates(**times):
    return {name: (lambda name=name, t=t: (name, t)) for name, t in times.items()}


def test_the_faster_path_is_chosen_and_remembered(timed):
    cpu = torch.device("cpu")
    key = ("path", 4096, 11008, 256, torch.bfloat16)
    assert gpu._choose_path(key, cpu, candidates(gemm=3e-4, tiled=1e-4), "gemm") == "tiled"
    assert timed == ["gemm", "tiled"]
    # the second call of the same key is not timed again, whatever the candidates say now
    assert gpu._choose_path(key, cpu, candidates(gemm=1e-9, tiled=1.0), "gemm") == "tiled"
    assert timed == ["gemm", "tiled"]
    # another token bucket is measured on its own
    other = ("path", 4096, 11008, 512, torch.bfloat16)
    assert gpu._choose_path(other, cpu, candidates(gemm=1e-4, tiled=2e-4), "gemm") == "gemm"


def test_a_path_that_fails_is_skipped_and_none_left_is_an_error(timed):
    cpu = torch.device("cpu")
    assert gpu._choose_path(("k1",), cpu, candidates(gemm=None, tiled=5e-4), "gemm") == "tiled"
    with pytest.raises(RuntimeError, match="no kernel path runs"):
        gpu._choose_path(("k2",), cpu, candidates(gemm=None, tiled=None), "gemm")


def test_without_timing_the_default_runs_and_nothing_is_remembered(monkeypatch):
    monkeypatch.setattr(gpu, "_path", {})
    monkeypatch.setattr(gpu, "_can_time", lambda device: False)
    key = ("path", 576, 576, 16, torch.bfloat16)
    assert gpu._choose_path(key, torch.device("cpu"), candidates(gemm=1.0, tiled=1e-6), "gemm") == "gemm"
    assert key not in gpu._path  # a later call (after graph capture, say) still measures


def test_cpu_tensors_are_never_timed():
    assert not gpu._can_time(torch.device("cpu"))


@pytest.mark.parametrize("text", ["sixty-four", "0", "-3", "1.5"])
def test_a_bad_integer_setting_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("DUOSERVE_GPU_SCRATCH_MIB", text)
    with pytest.raises(ValueError, match=r"DUOSERVE_GPU_SCRATCH_MIB must be an integer >= 1 .*got"):
        env_int("DUOSERVE_GPU_SCRATCH_MIB", 64, minimum=1)


def test_integer_settings_default_and_parse(monkeypatch):
    monkeypatch.delenv("DUOSERVE_GPU_SCRATCH_MIB", raising=False)
    assert env_int("DUOSERVE_GPU_SCRATCH_MIB", 64, minimum=1) == 64
    monkeypatch.setenv("DUOSERVE_GPU_SCRATCH_MIB", "16")
    assert env_int("DUOSERVE_GPU_SCRATCH_MIB", 64, minimum=1) == 16
