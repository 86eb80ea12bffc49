"""The AMX panel path (bf16 batches on the CPU's matrix engine) against fp32 dense.

The path is one template over its tile operations: the instructions (AMX hosts) or their scalar
emulation, which checks the hardware's shape rules. The emulated path runs on any CPU with
AVX512-BF16, so the layout and loop logic (pair panel as the B tile, chunk-major inputs as the A
tile, K-chunks of 512 active columns, token blocks of 16, 64-row halves) are tested on every such
host; the instructions themselves only where the CPU has AMX (skipped elsewhere, with the reason).
"""
import pytest
import torch
from cpu_paths import needs_ext, spmspv_path

from duoserve.kernels import cpu, dual_sparse_linear
from duoserve.kernels.check import Case, run_cases

SPARSITIES = [0.0, 0.5, 0.9, 1.0]
# odd output counts (a last row block of 1, 33, 75 rows; exactly 64 and 65), K not a multiple of
# 32 / 64 / 512 (and above 512: two K-chunks), 1..300 tokens (partial token blocks of 16)
CASES = [Case(n, k, t, 0.5, 0.5, torch.bfloat16) for n in (1, 3, 33, 971) for k in (7, 77, 515, 1100)
         for t in (1, 3, 16, 17)]
CASES += [Case(n, 300, t, 0.5, 0.5, torch.bfloat16) for n in (192, 193) for t in (2, 5, 33)]
CASES += [Case(971, 600, t, 0.5, 0.5, torch.bfloat16) for t in (31, 64, 129, 300)]
CASES += [Case(n, 301, 19, pw, px, torch.bfloat16) for n in (33, 193) for pw in SPARSITIES for px in SPARSITIES]
CASES += [Case(130, 515, 20, 0.5, 0.0, torch.bfloat16, thr_zero=True)]


def _skip_without_emulation():
    if not cpu.available():
        pytest.skip(f"CPU extension: {cpu.import_error()}")
    if not cpu.has_bf16_dot():
        pytest.skip("the AMX path decodes with the panel walk's AVX-512 BF16 / BITALG instructions; this CPU lacks them")


@pytest.fixture
def amx_mode():
    """Set the AMX mode and minimum tokens for one test; restores auto / measured after it."""
    def set_mode(mode, min_tokens=1):
        cpu.set_amx(mode)
        cpu.set_amx_min_tokens(min_tokens)
    yield set_mode
    cpu.set_amx("auto")
    cpu.set_amx_min_tokens(None)


@needs_ext
def test_emulated_probe_matches_reference():
    _skip_without_emulation()
    err = cpu.amx_probe("emulate")
    assert err <= cpu.amx_probe_tolerance(), err


@needs_ext
@pytest.mark.parametrize("impl_name", ["spmspv", "op"])
def test_emulated_amx_path_matches_fp32_dense(amx_mode, impl_name):
    _skip_without_emulation()
    amx_mode("emulate")
    assert cpu.amx()[0] == "emulated"
    impl = spmspv_path(False) if impl_name == "spmspv" else dual_sparse_linear
    failures = run_cases(impl, CASES, "cpu")
    assert not failures, f"{len(failures)} of {len(CASES)} failed:\n" + "\n".join(failures[:10])


@needs_ext
def test_emulated_path_below_min_tokens_takes_the_walks(amx_mode):
    """Below the minimum the walks run: the same results either way (a forced policy, both sides)."""
    _skip_without_emulation()
    amx_mode("emulate", min_tokens=8)
    assert cpu.amx_min_tokens() == 8
    failures = run_cases(spmspv_path(False), [Case(193, 300, t, 0.5, 0.5, torch.bfloat16) for t in (1, 7, 8, 9)], "cpu")
    assert not failures, "\n".join(failures)


@needs_ext
def test_amx_instructions_match_fp32_dense(amx_mode):
    """On an AMX host: the self-check passed ('auto' uses the tiles) and the path is exact on every case."""
    if not cpu.available():
        pytest.skip(f"CPU extension: {cpu.import_error()}")
    what, why = cpu.amx()
    if what != "tiles":
        pytest.skip(f"AMX tiles unavailable here: {why}")
    assert cpu.amx_probe("tiles") <= cpu.amx_probe_tolerance()
    amx_mode("on")
    failures = run_cases(spmspv_path(False), CASES, "cpu")
    assert not failures, f"{len(failures)} of {len(CASES)} failed:\n" + "\n".join(failures[:10])


@needs_ext
def test_amx_modes_and_errors(amx_mode):
    assert cpu.amx()[0] in ("tiles", "off")  # auto
    from duoserve.kernels.cpu_features import cpu_has_amx

    if not cpu_has_amx():
        assert cpu.amx()[0] == "off" and "lacks AMX" in cpu.amx()[1]
        with pytest.raises(RuntimeError, match="AMX requested but unavailable: the CPU or OS lacks AMX"):
            cpu.set_amx("on")
        with pytest.raises(RuntimeError, match="AMX unavailable"):
            cpu.amx_probe("tiles")
    amx_mode("off")
    assert cpu.amx() == ("off", "turned off (set_amx / DUOSERVE_CPU_AMX)")
    with pytest.raises(RuntimeError, match="auto, off, on or emulate"):
        cpu.set_amx("fast")
    with pytest.raises(RuntimeError, match="-1 \\(measured\\) or >= 1"):
        cpu.set_amx_min_tokens(0)
