"""CPU paths (native spMspV with AVX-512 and scalar, tiled prefill, the op) and the reference
against an fp32 dense computation on odd shapes, sparsities, thresholds 0 / inf, T = 1..17."""
import pytest
import torch

from duoserve.kernels import cpu, dual_sparse_linear, dual_sparse_linear_reference, unpack_dense
from duoserve.kernels.check import Case, compare, grid, make_inputs, run_cases

DTYPES = [torch.bfloat16, torch.float32]
needs_ext = pytest.mark.skipif(not cpu.available(), reason=f"CPU extension: {cpu.import_error()}")
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
# shapes x token counts at p_w = p_x = 0.5 (plus threshold 0), every (p_w, p_x) at two shapes,
# and every T in 1..17 at one shape: all the axes without their full product (the suite stays fast)
CASES = grid([1, 3, 33, 971], [77, 300], [1, 3, 17], [0.5], [0.5], DTYPES)
CASES += grid([971], [300], [3], SPARSITIES, SPARSITIES, DTYPES, thr_zero=False)
CASES += grid([33], [77], [1], SPARSITIES, SPARSITIES, DTYPES, thr_zero=False)
CASES += [Case(33, 300, t, 0.5, 0.5, dt) for t in range(1, 18) for dt in DTYPES]
CASES += [Case(971, 77, 5, 0.5, 0.5, dt, bias=False) for dt in DTYPES]


def _spmspv(force_scalar):
    return lambda x, p, t, b: cpu.spmspv(x, p.bitmap, p.offsets, p.values, t, b, p.n, force_scalar)


def _tiled(x, p, t, b):
    return cpu.tiled(x, p.bitmap, p.offsets, p.values, t, b, p.n)


@pytest.fixture(params=[0.0, 0.8, 2.0], ids=["skip-inactive", "default-policy", "walk-all"])
def walk_policy(request):
    """The spMspV walk either skips inactive columns or walks them all (with zero inputs); the
    default decides by the fraction inactive. Every policy must give the same products."""
    if not cpu.available():
        pytest.skip(f"CPU extension: {cpu.import_error()}")
    saved = cpu.walk_all_max_inactive()
    cpu.set_walk_all_max_inactive(request.param)
    yield request.param
    cpu.set_walk_all_max_inactive(saved)


@needs_ext
@pytest.mark.parametrize("name,impl", [("spmspv", _spmspv(False)), ("spmspv-scalar", _spmspv(True)),
                                       ("tiled", _tiled), ("op", dual_sparse_linear)])
def test_cpu_paths_match_fp32_dense(name, impl, walk_policy):
    if name == "tiled" and walk_policy != 0.8:
        pytest.skip("the tiled path does not walk columns")
    failures = run_cases(impl, CASES, "cpu")
    assert not failures, f"{len(failures)} of {len(CASES)} failed:\n" + "\n".join(failures[:10])


@needs_ext
def test_walk_policy_default_and_setter():
    assert cpu.walk_all_max_inactive() == pytest.approx(0.8)
    cpu.set_walk_all_max_inactive(0.5)
    try:
        assert cpu.walk_all_max_inactive() == pytest.approx(0.5)
    finally:
        cpu.set_walk_all_max_inactive(0.8)


def test_reference_matches_fp32_dense():
    impl = lambda x, p, t, b: dual_sparse_linear_reference(x, unpack_dense(p), t, b)  # noqa: E731
    failures = run_cases(impl, CASES[::7], "cpu")
    assert not failures, "\n".join(failures[:10])


@needs_ext
def test_op_handles_fp16_and_large_batches():
    cases = [Case(130, 300, t, 0.5, 0.5, torch.float16) for t in (1, 40)]
    cases += [Case(130, 300, 40, 0.5, 0.5, dt) for dt in DTYPES]
    assert not run_cases(dual_sparse_linear, cases, "cpu")


@needs_ext
def test_masked_nan_and_inf_inputs_contribute_zero():
    x, w, thr, bias = make_inputs(Case(33, 77, 3, 0.5, 0.5, torch.bfloat16), "cpu")
    x = x.clone()
    x[:, 5] = float("nan")  # |NaN| > t is false: dropped
    y = dual_sparse_linear(x, __import__("duoserve.kernels", fromlist=["pack_dense"]).pack_dense(w),
                           thr, bias)
    assert not torch.isnan(y).any()
    x[:, 5] = 0
    assert compare(y, x, w, thr, bias) is None


@needs_ext
def test_threshold_inf_gives_bias_and_zero_gives_dense():
    from duoserve.kernels import pack_dense
    x, w, _, bias = make_inputs(Case(33, 77, 2, 0.5, 0.0, torch.float32), "cpu")
    packed = pack_dense(w)
    assert torch.equal(dual_sparse_linear(x, packed, float("inf"), bias), bias.expand(2, 33))
    torch.testing.assert_close(dual_sparse_linear(x, packed, 0.0), x @ w.t(), rtol=1e-5, atol=1e-5)


@needs_ext
def test_leading_dims_and_isa():
    from duoserve.kernels import pack_dense
    x, w, thr, _ = make_inputs(Case(33, 77, 6, 0.5, 0.5, torch.float32), "cpu")
    y = dual_sparse_linear(x.view(2, 3, 77), pack_dense(w), thr)
    assert y.shape == (2, 3, 33)
    assert compare(y.view(6, 33), x, w, thr, None) is None
    assert cpu.isa() in ("avx512", "scalar")


@needs_ext
def test_multithreaded_matches():
    torch.set_num_threads(2)  # the autouse fixture restores the count
    cases = [Case(971, 4096, t, 0.5, 0.5, dt) for t in (1, 5, 40) for dt in DTYPES]
    assert not run_cases(dual_sparse_linear, cases, "cpu")
