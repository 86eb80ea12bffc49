"""CPU paths (native spMspV with each SIMD decoder and scalar, tiled prefill, the op) and the reference
against an fp32 dense computation on odd shapes, sparsities, thresholds 0 / inf, T = 1..17. The
settings that choose between the paths: test_cpu_settings.py."""
import pytest
import torch
from cpu_paths import DTYPES, needs_ext, spmspv_path, tiled_path

from duoserve.kernels import cpu, dual_sparse_linear, dual_sparse_linear_reference, unpack_dense
from duoserve.kernels.check import Case, compare, grid, make_inputs, run_cases
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
# shapes x token counts at p_w = p_x = 0.5 (plus threshold 0), every (p_w, p_x) at two shapes,
# and every T in 1..17 at one shape: all the axes without their full product (the suite stays fast)
CASES = grid([1, 3, 33, 971], [77, 300], [1, 3, 17], [0.5], [0.5], DTYPES)
CASES += grid([971], [300], [3], SPARSITIES, SPARSITIES, DTYPES, thr_zero=False)
CASES += grid([33], [77], [1], SPARSITIES, SPARSITIES, DTYPES, thr_zero=False)
CASES += [Case(33, 300, t, 0.5, 0.5, dt) for t in range(1, 18) for dt in DTYPES]
CASES += [Case(971, 77, 5, 0.5, 0.5, dt, bias=False) for dt in DTYPES]
# a last row block of exactly 64 rows (the walks then skip its second half) and of 65
CASES += [Case(n, 300, t, 0.5, 0.5, dt) for n in (192, 193) for t in (1, 2, 3, 5, 6) for dt in DTYPES]

WALK_POLICIES = {"skip-inactive": (0.0, 0.0), "skip-short-spans": (0.6, 144.0),
                 "walk-all-below-80pct-inactive": (0.8, 0.0), "walk-all": (2.0, 0.0)}


@pytest.fixture(params=list(WALK_POLICIES))
def walk_policy(request):
    """The spMspV walk either skips inactive columns or walks them all (with zero inputs), or
    decides by the fraction inactive and the weight's span length (skip-short-spans: the cases at
    p_w 0 walk all, those at 0.5 skip). Every policy must give the same products."""
    if not cpu.available():
        pytest.skip(f"CPU extension: {cpu.import_error()}")
    cpu.set_walk_all(*WALK_POLICIES[request.param])
    yield request.param
    cpu.set_walk_all(None)


@pytest.fixture(params=["expand", "permute", "avx2"])
def simd_decoder(request):
    """Each SIMD decoder of the walk, forced (by default the faster one is measured and kept; avx2
    is the choice only on CPUs without AVX-512)."""
    if not cpu.available():
        pytest.skip(f"CPU extension: {cpu.import_error()}")
    if request.param not in cpu.available_decoders():
        pytest.skip(f"this CPU cannot run the {request.param} decoder")
    cpu.set_decoder(request.param)
    yield request.param
    cpu.set_decoder(None)


@needs_ext
@pytest.mark.parametrize("name,impl", [("spmspv-scalar", spmspv_path(True)), ("tiled", tiled_path),
                                       ("op", dual_sparse_linear)])
def test_cpu_paths_match_fp32_dense(name, impl, walk_policy):
    if name == "tiled" and walk_policy != next(iter(WALK_POLICIES)):
        pytest.skip("the tiled path does not walk columns: run once")
    failures = run_cases(impl, CASES, "cpu")
    assert not failures, f"{len(failures)} of {len(CASES)} failed:\n" + "\n".join(failures[:10])


@needs_ext
def test_simd_walk_matches_fp32_dense(simd_decoder, walk_policy):
    failures = run_cases(spmspv_path(False), CASES, "cpu")
    assert not failures, f"{simd_decoder}: {len(failures)} of {len(CASES)} failed:\n" + "\n".join(failures[:10])


@needs_ext
def test_tiled_path_with_each_decoder(simd_decoder):
    """The prefill path decompresses its tiles with the walk's decoder."""
    cases = CASES + [Case(130, 300, 40, 0.5, 0.5, torch.float16)]
    failures = run_cases(tiled_path, cases, "cpu")
    assert not failures, f"{simd_decoder}: {len(failures)} of {len(cases)} failed:\n" + "\n".join(failures[:10])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_mask_input_matches_torch_where(dtype):
    """The prefill path's branch-free masking: |x| > t kept, the rest (NaN included) exact zeros."""
    x = torch.randn(37, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).to(dtype)
    for t in (0.0, 0.5, float("inf")):
        want = torch.where(x.abs().float() > t, x, torch.zeros((), dtype=dtype))
        got = cpu._load().mask_input(x, torch.tensor(t))
        assert got.dtype == dtype and torch.equal(got, want), (dtype, t)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_simd_decoders_are_bit_identical(dtype):
    """The SIMD decoders do the same fp32 operations in the same order per row, so the measured
    choice can never change a result."""
    names = [d for d in ("expand", "permute", "avx2") if d in cpu.available_decoders()]
    if len(names) < 2:
        pytest.skip(f"this CPU runs only {names}")
    from duoserve.kernels import pack_dense
    saved_dot = cpu.bf16_dot_request()
    cpu.set_bf16_dot_tokens(0)  # the panel walk (its own gather, vdpbf16ps rounding) would run at 7 tokens
    try:
        for case in (Case(971, 300, 1, 0.5, 0.5, dtype), Case(260, 1000, 7, 0.9, 0.3, dtype)):
            x, w, thr, bias = make_inputs(case, "cpu")
            p = pack_dense(w)
            outs = []
            for name in names:
                cpu.set_decoder(name)
                try:
                    outs.append(spmspv_path(False)(x, p, thr, bias))
                finally:
                    cpu.set_decoder(None)
            assert all(torch.equal(outs[0], out) for out in outs[1:]), (case, names)
    finally:
        cpu.set_bf16_dot_tokens(*saved_dot)


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
def test_leading_dims():
    from duoserve.kernels import pack_dense
    x, w, thr, _ = make_inputs(Case(33, 77, 6, 0.5, 0.5, torch.float32), "cpu")
    y = dual_sparse_linear(x.view(2, 3, 77), pack_dense(w), thr)
    assert y.shape == (2, 3, 33)
    assert compare(y.view(6, 33), x, w, thr, None) is None


@needs_ext
def test_multithreaded_matches():
    torch.set_num_threads(2)  # the autouse fixture restores the count
    cases = [Case(971, 4096, t, 0.5, 0.5, dt) for t in (1, 5, 40) for dt in DTYPES]
    assert not run_cases(dual_sparse_linear, cases, "cpu")


@needs_ext
def test_one_pass_slices_match_passes_of_three():
    """Batches of 4-12 tokens (bf16, permute decoder) walk row slices in one pass (64-row halves up to
    6 tokens, 32-row quarters from 7); the fp32 sums per row are the same operations in the same
    order as passes of 3 tokens, so the results are equal, whatever the slice limit."""
    if "permute" not in cpu.available_decoders():
        pytest.skip("this CPU cannot run the permute decoder")
    from duoserve.kernels import pack_dense
    assert cpu.slices_max_tokens() == 12
    cpu.set_decoder("permute")
    saved_dot = cpu.bf16_dot_request()
    cpu.set_bf16_dot_tokens(0)  # the FMA walks: same operations in the same order (the panel walk: its own test)
    try:
        for t in (4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17, 25):
            x, w, thr, bias = make_inputs(Case(971, 700, t, 0.5, 0.5, torch.bfloat16), "cpu")  # 700: 3 chunks
            p = pack_dense(w)
            one_pass = spmspv_path(False)(x, p, thr, bias)
            results = {}
            for limit in (0, 6, 8):
                cpu.set_slices_max_tokens(limit)
                try:
                    results[limit] = spmspv_path(False)(x, p, thr, bias)
                finally:
                    cpu.set_slices_max_tokens(12)
            for limit, other in results.items():
                assert torch.equal(one_pass, other), (t, limit)
            assert compare(one_pass, x, w, thr, bias) is None
    finally:
        cpu.set_decoder(None)
        cpu.set_bf16_dot_tokens(*saved_dot)
    for bad in (3, 13):
        with pytest.raises(RuntimeError, match="0 \\(off\\) or 4..12"):
            cpu.set_slices_max_tokens(bad)


@needs_ext
@pytest.mark.parametrize("min_tokens", [1, 7, 9])
def test_bf16_panel_walk_matches_fp32_dense(min_tokens):
    """The vdpbf16ps panel walk (two columns a pair, odd column counts padded with a zero column,
    chunks of 64 columns, 64-row halves, token groups of up to 6; a last row block of at most 64
    rows skips its second half: 130 and 192 outputs, 193 does not) against fp32 dense on every
    case; a no-op on CPUs without AVX512-BF16."""
    lo, hi = cpu.bf16_dot_tokens()
    assert cpu.bf16_dot_min_measured() and lo in (4, 5) and hi == 256  # the defaults
    saved_dot = cpu.bf16_dot_request()
    cpu.set_bf16_dot_tokens(min_tokens)
    try:
        cases = CASES + [Case(971, 700, t, 0.5, 0.5, torch.bfloat16) for t in (1, 2, 6, 7, 8, 12, 13, 19, 40, 64, 129, 256)]
        cases += [Case(n, 301, 7, pw, px, torch.bfloat16, thr_zero=False) for n in (1, 33, 130, 192, 193)
                  for pw in (0.0, 0.9) for px in (0.0, 0.5, 1.0)]
        failures = run_cases(spmspv_path(False), cases, "cpu")
        assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures[:10])
    finally:
        cpu.set_bf16_dot_tokens(*saved_dot)
    assert cpu.bf16_dot_min_measured() and cpu.bf16_dot_tokens() == (lo, hi)  # restored to the measured
    for bad_lo, bad_hi in ((-2, 64), (8, 7), (7, 5000), (-1, 4)):
        with pytest.raises(RuntimeError, match="min_tokens 0 \\(off\\), -1 \\(measured: 4 or 5\\) or 1 <= min_tokens"):
            cpu.set_bf16_dot_tokens(bad_lo, bad_hi)
