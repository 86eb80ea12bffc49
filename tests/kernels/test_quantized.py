"""The quantized dual-sparse op (int4/int8 codes, per-group fp16 scales) against the fp32 oracle
on the dequantized weight: odd shapes, K not a multiple of G, empty columns, all-zero groups,
batch 1..33, several sparsities."""
import pytest
import torch

from duoserve.kernels import (
    QPackedWeight, dual_sparse_linear_q, dual_sparse_linear_q_reference, dual_sparse_linear_reference,
    pack_quantized, pack_quantized_dense, unpack_dequantized,
)
from duoserve.kernels.qops import native_cpu


def random_quantized(n, k, p_w, bits, group, seed=0, empty_cols=(), zero_group=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) >= p_w
    for c in empty_cols:
        mask[:, c] = False
    if zero_group is not None:
        mask[:, zero_group * group:(zero_group + 1) * group] = False
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g)
    scales = (torch.rand(n, -(-k // group), generator=g) * 0.05 + 1e-3).half()
    return codes, mask, scales


def dequantized(codes, mask, scales, bits, group):
    k = mask.shape[1]
    full = scales.float().repeat_interleave(group, dim=1)[:, :k]
    return torch.where(mask, (codes.float() - (2 ** (bits - 1) - 0.5)) * full, torch.zeros(()))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n,k,group", [(1, 8, 8), (33, 200, 64), (130, 971, 128), (7, 100, 32)])
@pytest.mark.parametrize("p_w", [0.0, 0.5, 0.9, 1.0])
def test_pack_unpack_is_exact(bits, n, k, group, p_w):
    codes, mask, scales = random_quantized(n, k, p_w, bits, group, seed=n + k)
    q = pack_quantized_dense(codes, mask, scales, bits, group)
    q.check_index()
    assert q.nnz == int(mask.sum())
    assert torch.equal(unpack_dequantized(q), dequantized(codes, mask, scales, bits, group))


def test_pack_from_the_checkpoint_encoding_equals_pack_from_dense():
    from duoserve.format.bitmask import encode_bitmask

    codes, mask, scales = random_quantized(40, 77, 0.5, 4, 16, seed=3)
    bitmask, _ = encode_bitmask(mask.float())
    a = pack_quantized(bitmask, codes[mask].to(torch.uint8), scales, (40, 77), 4, 16)
    b = pack_quantized_dense(codes, mask, scales, 4, 16)
    for key, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[key]), key


@pytest.mark.parametrize("bits,bar", [(4, 0.45), (8, 0.70)])
def test_bytes_per_weight_at_half_sparsity(bits, bar):
    codes, mask, scales = random_quantized(1024, 1024, 0.5, bits, 128)
    q = pack_quantized_dense(codes, mask, scales, bits, 128)
    assert q.bytes_per_element() <= bar, q.bytes_per_element()


CASES = [  # (n, k, group, p_w, empty columns, all-zero group)
    (1, 8, 8, 0.5, (), None), (33, 200, 64, 0.5, (0, 5, 199), 1), (130, 971, 128, 0.5, (3,), 2),
    (257, 333, 32, 0.0, (), None), (64, 256, 128, 0.9, (), 0), (16, 64, 16, 1.0, (), None)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 9, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decode", ["default", "panel", "pairs", "expand", "scalar"])  # the CPU kernel's walks
def test_op_matches_the_fp32_oracle_on_the_dequantized_weight(bits, case, tokens, dtype, decode, monkeypatch):
    if decode != "default":
        skip_unless_cpu_runs(decode)
        monkeypatch.setenv("DUOSERVE_CPU_QUANT_DECODE", decode)
    n, k, group, p_w, empty, zero_group = case
    codes, mask, scales = random_quantized(n, k, p_w, bits, group, seed=tokens, empty_cols=empty,
                                           zero_group=zero_group)
    q = pack_quantized_dense(codes, mask, scales, bits, group)
    g = torch.Generator().manual_seed(tokens + n)
    x = torch.randn(tokens, k, generator=g).to(dtype)
    x[:, 1::7] = 0.0  # columns inactive for every token
    if tokens > 1:
        x[0, 2] = float("nan")  # a NaN input is dropped by the mask (|nan| > t is false)
    bias = torch.randn(n, generator=g).to(dtype)
    thr = 0.3
    want = dual_sparse_linear_reference(x, dequantized(codes, mask, scales, bits, group), thr, bias)
    got = dual_sparse_linear_q(x, q, thr, bias)
    assert got.dtype == dtype and got.shape == (tokens, n)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want.float(), **tol)
    torch.testing.assert_close(dual_sparse_linear_q_reference(x, q, thr, bias).float(), want.float(), **tol)


# What each forced walk of the CPU kernel needs (kernels/csrc/dual_sparse_q_cpu.cpp, quant_decode).
WALK_FLAGS = {"scalar": set(), "expand": {"avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vbmi2"},
              "pairs": {"avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vbmi2", "avx512_bf16"}}
WALK_FLAGS["panel"] = WALK_FLAGS["pairs"]


def skip_unless_cpu_runs(walk):
    from duoserve.kernels import cpu
    from duoserve.kernels.cpu_features import cpu_flags

    if not (cpu.available() and native_cpu()):
        pytest.skip("the native CPU kernel is not built")
    missing = WALK_FLAGS[walk] - cpu_flags()
    if missing:
        pytest.skip(f"the {walk} walk needs {', '.join(sorted(missing))}, which this CPU lacks")


@pytest.mark.parametrize("walk", ["pairs", "panel"])
@pytest.mark.parametrize("group", [8, 16, 128])
@pytest.mark.parametrize("tokens", [1, 2, 5, 7, 13])
def test_pair_walks_pair_columns_within_groups(walk, group, tokens, monkeypatch):
    """The pair and panel walks multiply two active columns of one group at a time: groups with an odd
    number of active columns, groups with one, groups with none, and the last group cut short by K;
    the panel walk also splits groups of more than 64 active columns into chunks (G 128)."""
    skip_unless_cpu_runs(walk)
    monkeypatch.setenv("DUOSERVE_CPU_QUANT_DECODE", walk)
    n, k = 131, 5 * group + 3
    codes, mask, scales = random_quantized(n, k, 0.5, 4, group, seed=group + tokens)
    q = pack_quantized_dense(codes, mask, scales, 4, group)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, k, generator=g)
    x[:, group:2 * group] = 0.0  # a group with no active column
    x[:, 2 * group + 1:3 * group] = 0.0  # one active column (paired with itself)
    x[:, 3 * group:4 * group:2] = 0.0  # an odd or even count of active columns, depending on G
    x[:, 3 * group + 1] = 0.0
    x = x.to(torch.bfloat16)
    want = dual_sparse_linear_reference(x, dequantized(codes, mask, scales, 4, group), 0.0)
    torch.testing.assert_close(dual_sparse_linear_q(x, q, 0.0).float(), want.float(), atol=2e-2, rtol=2e-2)


def test_an_unknown_decode_setting_is_refused(monkeypatch):
    skip_unless_cpu_runs("scalar")
    monkeypatch.setenv("DUOSERVE_CPU_QUANT_DECODE", "fast")
    codes, mask, scales = random_quantized(8, 16, 0.5, 4, 8)
    q = pack_quantized_dense(codes, mask, scales, 4, 8)
    with pytest.raises(RuntimeError, match="must be scalar, expand, pairs or panel"):
        dual_sparse_linear_q(torch.randn(1, 16), q, 0.0)


def test_threshold_zero_and_inf():
    codes, mask, scales = random_quantized(40, 96, 0.5, 4, 32, seed=9)
    q = pack_quantized_dense(codes, mask, scales, 4, 32)
    x = torch.randn(3, 96)
    dense = dequantized(codes, mask, scales, 4, 32)
    torch.testing.assert_close(dual_sparse_linear_q(x, q, 0.0), x @ dense.T, atol=1e-4, rtol=1e-4)
    assert torch.equal(dual_sparse_linear_q(x, q, float("inf")), torch.zeros(3, 40))


def test_the_native_kernel_runs_when_the_extension_has_it():
    from duoserve.kernels import cpu

    if not cpu.available():
        pytest.skip("CPU extension not built")
    assert native_cpu(), "the built extension lacks dual_sparse_linear_q: rebuild it (setup.py build_ext)"


def test_compiles_with_fullgraph():
    codes, mask, scales = random_quantized(20, 40, 0.5, 8, 8, seed=1)
    q = pack_quantized_dense(codes, mask, scales, 8, 8)
    thr = torch.tensor(0.1)

    def f(x, bitmap, offsets, c, s):
        return torch.ops.duoserve.dual_sparse_linear_q(x, bitmap, offsets, c, s, thr, None, 20, 40, 8, 8)

    x = torch.randn(2, 40)
    out = torch.compile(f, fullgraph=True, backend="eager")(x, q.bitmap, q.offsets, q.codes, q.scales)
    torch.testing.assert_close(out, dual_sparse_linear_q_reference(x, q, thr), atol=1e-4, rtol=1e-4)


def test_bad_packed_weights_are_refused():
    codes, mask, scales = random_quantized(8, 16, 0.5, 4, 8)
    q = pack_quantized_dense(codes, mask, scales, 4, 8)
    with pytest.raises(ValueError, match="scales must be float16"):
        QPackedWeight(8, 16, 4, 8, q.bitmap, q.offsets, q.codes, q.scales.float())
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QPackedWeight(8, 16, 3, 8, q.bitmap, q.offsets, q.codes, q.scales)
    bad = QPackedWeight(8, 16, 4, 8, q.bitmap, q.offsets, q.codes[:-1].contiguous(), q.scales)
    with pytest.raises(ValueError, match="code bytes"):
        bad.check_index()
    with pytest.raises(ValueError, match="codes outside"):
        pack_quantized_dense(codes + 16, mask, scales, 4, 8)
