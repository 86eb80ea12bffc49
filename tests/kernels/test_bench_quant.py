"""`python -m duoserve.kernels.bench --int4`: one row per point, all three kernels timed in one run."""
import pytest
import torch

from duoserve.kernels import bench
from duoserve.kernels.bench_quant import group_for, torch_int4


@pytest.mark.parametrize("cold", [0, 1])
def test_int4_run_writes_one_row_per_point(tmp_path, cold):
    md = tmp_path / "int4.md"
    bench.main(["--int4", "--shapes", "144x128,64x576", "--pw", "0.5", "--px", "0,0.5", "--batch", "1,2",
                "--cold-mib", str(cold), "--markdown", str(md)])
    rows = [line for line in md.read_text().splitlines() if line.startswith("| 144x128") or line.startswith("| 64x576")]
    assert len(rows) == 2 * 2 * 2
    assert "dense int4 us" in md.read_text() and "| 64 |" in rows[-1]  # K = 576: groups of 64


def test_the_torch_int4_baseline_computes_a_matmul():
    # dequantization of torch's CPU int4 layout: (q - 8) * scale + zero, per group of G along K
    packed, sz = torch_int4(32, 256, group_for(256))
    x = torch.randn(2, 256).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz)
    assert y.shape == (2, 32) and bool(torch.isfinite(y).all())
