"""scripts/bench_serve.py --profile: reading vLLM's profiler table into ms per request by kind of op."""
from __future__ import annotations

import pytest
from script_module import load_script

HEADER = """------------------------------------------  ------------  ------------  ------------  ------------  ------------  ------------
                                      Name    Self CPU %      Self CPU   CPU total %     CPU total  CPU time avg    # of Calls
------------------------------------------  ------------  ------------  ------------  ------------  ------------  ------------
"""


def row(name, self_t, total_t, calls):
    return f"{name:>42s}  {'1.00%':>12s}  {self_t:>12s}  {'1.00%':>12s}  {total_t:>12s}  {'1.000ms':>12s}  {calls:>12d}  [[141, 576]]\n"


def test_sums_self_times_per_kind_and_counts_calls_per_request():
    table = HEADER + (
        row("duoserve::dual_sparse_linear_q", "400.000ms", "410.000ms", 300)
        + row("duoserve::dual_sparse_linear_q", "100.000ms", "101.000ms", 150)
        + row("_C::onednn_mm", "20.000ms", "20.100ms", 5)  # lm_head
        + row("_C::cpu_attention_with_kv_cache", "50.000ms", "50.000ms", 150)
        + row("vllm::unified_kv_cache_update", "10.000ms", "12.000ms", 150)
        + row("execute_context_1(141)_generation_0(0)", "10.000ms", "1.100s", 5)
        + row("execute_context_0(0)_generation_0(0)", "1.000ms", "1.200ms", 5)  # an empty step: not the prefill
        + row("aten::copy_", "900.000us", "900.000us", 450))
    got = load_script("bench_serve").profile_table(table, 5)
    assert got["duoserve linears"] == pytest.approx(100.0)
    assert got["duoserve linears: calls"] == 90
    assert got["dense GEMM (linears, lm_head)"] == pytest.approx(4.0)
    assert got["attention"] == pytest.approx(12.0)
    assert got["forward (total)"] == pytest.approx(220.0)
    assert "attention: calls" not in got and not any("copy" in k for k in got)
