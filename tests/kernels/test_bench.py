"""The kernel benchmark's CPU sweep end to end on a tiny shape: the markdown table it writes, and
the alternated-rounds mode for hosts whose memory timings drift; the kernels' tools refuse bad
arguments as usage errors."""
import importlib

import pytest
import torch
from cpu_paths import needs_ext

from duoserve.kernels import bench, bench_decode


@needs_ext
@pytest.mark.parametrize("rounds", [1, 3])
def test_cold_sweep_writes_one_row_per_point(tmp_path, rounds):
    out = tmp_path / "bar.md"
    bench.main(["--shapes", "130x70", "--pw", "0.5", "--px", "0,0.5", "--batch", "1,2", "--cold-mib", "1",
                "--rounds", str(rounds), "--markdown", str(out)])
    text = out.read_text()
    assert ("medians of 3 alternated rounds" in text) == (rounds == 3)
    rows = [line for line in text.splitlines() if line.startswith("| 130x70 |")]
    assert len(rows) == 4  # p_x 0 / 0.5 x batch 1 / 2
    for row in rows:
        dense_us, dual_us, speedup = (float(c.strip(" *x")) for c in row.split("|")[5:8])
        assert dense_us > 0 and dual_us > 0 and speedup > 0



@pytest.mark.parametrize("argv, message", [
    (["--shapes", "foo"], "neither a shape group"),
    (["--shapes", "4096x0"], "neither a shape group"),
    (["--shapes", "576x576,"], "comma-separated"),
    (["--batch", "0"], "must be >= 1"),
    (["--batch", "two"], "not an integer"),
    (["--pw", "1.5"], "fraction in [0, 1]"),
    (["--px", "nan"], "fraction in [0, 1]"),
    (["--cold-mib", "-5"], "must be >= 0"),
    (["--threads", "0"], "must be >= 1"),
    (["--rounds", "0"], "must be >= 1"),
    (["--bar", "--rounds", "9"], "--rounds applies to CPU runs with --cold-mib"),
    (["--device", "tpu"], "not a device"),
])
def test_bad_arguments_are_usage_errors(capsys, argv, message):
    """A bad value stops the bench before any work, with exit status 2 and what was wrong."""
    with pytest.raises(SystemExit) as stop:
        bench.main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("tool", ["bench", "bench_decode", "check"])
def test_cuda_without_cuda_is_a_usage_error(capsys, tool):
    module = importlib.import_module(f"duoserve.kernels.{tool}")
    with pytest.raises(SystemExit) as stop:
        module.main(["--device", "cuda"])
    assert stop.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu", "--hidden", "100", "--heads", "3"], "not a multiple of --heads"),
    (["--device", "cpu", "--hidden", "96", "--heads", "32"], "must be even"),
    (["--device", "cpu", "--p_x", "2"], "fraction in [0, 1]"),
    (["--device", "cpu", "--layers", "0"], "must be >= 1"),
])
def test_bench_decode_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        bench_decode.main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
