"""The kernel benchmark's CPU sweep end to end on a tiny shape: the markdown table it writes, and
the alternated-rounds mode for hosts whose memory timings drift."""
import pytest
from cpu_paths import needs_ext

from duoserve.kernels import bench


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


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        bench.main(["--bar", "--rounds", "0"])
