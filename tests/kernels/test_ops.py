"""The custom op contract: schema/fake checks (opcheck), torch.compile, the fallback without the
extension, and (with CUDA) the GPU paths and CUDA-graph capture."""
import os
import subprocess
import sys

import pytest
import torch

from duoserve.kernels import cpu, dual_sparse_linear, pack_dense
from duoserve.kernels.check import Case, compare, make_inputs, run_cases


def _args(t=3, dtype=torch.float32, device="cpu"):
    x, w, thr, bias = make_inputs(Case(130, 77, t, 0.5, 0.5, dtype), device)
    p = pack_dense(w)
    return (x, p.bitmap, p.offsets, p.values, thr, bias, p.n, p.k), (x, w, thr, bias, p)


def test_opcheck():
    args, _ = _args()
    torch.library.opcheck(torch.ops.duoserve.dual_sparse_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_fake_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    args, _ = _args(t=5)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.ops.duoserve.dual_sparse_linear(*args)
    assert tuple(y.shape) == (5, 130) and y.dtype == torch.float32


def test_torch_compile_fullgraph_traces_the_op():
    _, (x, w, thr, bias, packed) = _args(dtype=torch.bfloat16)

    class Layer(torch.nn.Module):  # how a vLLM linear method stores it: plain attributes
        def __init__(self):
            super().__init__()
            for name, t in packed.tensors().items():
                self.register_buffer(name, t)
            self.register_buffer("thr", thr)
            self.n, self.k = packed.n, packed.k

        def forward(self, x):
            p = type(packed).from_tensors({"bitmap": self.bitmap, "offsets": self.offsets,
                                           "values": self.values}, self.n, self.k)
            return dual_sparse_linear(x, p, self.thr, bias)

    torch._dynamo.reset()
    y = torch.compile(Layer(), fullgraph=True, dynamic=True)(x)
    assert compare(y, x, w, thr, bias) is None


def test_dtype_mismatch_is_an_error():
    _, (x, _, thr, _, packed) = _args()
    with pytest.raises((ValueError, RuntimeError)):
        dual_sparse_linear(x.bfloat16(), packed, thr)


def test_wrong_input_width_or_bias_length_is_a_clear_error():
    _, (x, _, thr, bias, packed) = _args()
    with pytest.raises(ValueError, match="input features"):
        dual_sparse_linear(x[:, 1:], packed, thr)
    with pytest.raises(ValueError, match=r"bias must be \[\d+\]"):
        dual_sparse_linear(x, packed, thr, torch.zeros(packed.n + 1, dtype=x.dtype))


def test_values_without_their_padding_are_refused_before_any_kernel_reads_past_them():
    from duoserve.kernels import ops

    _, (x, _, _, _, packed) = _args()
    ops._check(x, packed.values, packed.k)  # the packed form carries it
    with pytest.raises(ValueError, match="128 elements of trailing padding"):
        ops._check(x, packed.values[:100], packed.k)


def test_reference_fallback_without_extension_warns_once():
    code = (
        "import logging, torch; logging.basicConfig(level=logging.WARNING)\n"
        "from duoserve.kernels import dual_sparse_linear, pack_dense, cpu\n"
        "assert not cpu.available()\n"
        "w = torch.randn(33, 77); x = torch.randn(2, 77)\n"
        "p = pack_dense(w)\n"
        "for _ in range(3): y = dual_sparse_linear(x, p, 0.0)\n"
        "torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)\n")
    env = {**os.environ, "_DUOSERVE_TEST_NO_CPU_EXTENSION": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("extension not built") == 1, proc.stderr[-3000:]


def test_kernel_backend_names_what_runs():
    from duoserve.kernels import cpu, kernel_backend
    text = kernel_backend("cpu", torch.bfloat16)
    if cpu.available():
        assert text.startswith("native CPU kernel") and f"{cpu.decoder(torch.bfloat16)} decoder" in text
        panel = cpu.panel_walk_tokens() is not None
        assert f"up to {256 if panel else cpu.sparse_max_tokens()} tokens" in text
        lo, hi = cpu.bf16_dot_tokens()
        assert (f"the bf16 panel walk (vdpbf16ps) at {lo}-{hi} tokens (the minimum measured on this machine)"
                in text) == panel
        assert "panel" not in kernel_backend("cpu", torch.float32)
        assert f"up to {cpu.sparse_max_tokens(torch.float32)} tokens" in kernel_backend("cpu", torch.float32)
        assert "decompress + fp32 matmul" in kernel_backend("cpu", torch.float16)
        max_inactive, min_span = cpu.walk_all()  # the walk-all policy in use (measured here)
        assert f"under {max_inactive:g} of them are inactive and a weight's spans average over {min_span:g} B" in text
    else:
        assert "reference" in text
    assert "Triton" in kernel_backend("cuda", torch.bfloat16)
    assert kernel_backend(torch.device("meta"), torch.float32) == "no duoserve kernel for meta"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_gpu_paths_match_fp32_dense():
    cases = [Case(n, k, t, 0.5, 0.5, dt) for n in (1, 33, 971) for k in (77, 4100)
             for t in (1, 3, 17) for dt in (torch.float16, torch.bfloat16, torch.float32)]
    failures = run_cases(dual_sparse_linear, cases, "cuda")
    assert not failures, "\n".join(failures[:10])


@pytest.mark.gpu
@cuda
def test_gpu_decode_in_cuda_graph():
    _, (x, w, thr, bias, packed) = _args(t=1, dtype=torch.bfloat16, device="cuda")
    y = dual_sparse_linear(x, packed, thr, bias)  # warm-up: compiles and tunes before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = dual_sparse_linear(x, packed, thr, bias)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert compare(y, x, w, thr, bias) is None


@pytest.mark.skipif(not cpu.available(), reason="native CPU kernel not built")
def test_native_op_refuses_what_would_read_or_write_out_of_bounds():
    """The registered op called directly (no Python wrapper): a corrupted index, a bias of the
    wrong length or a threshold of several numbers is a RuntimeError naming the problem, never a
    read past the tensors."""
    _, (x, _, thr, _, packed) = _args()
    op = torch.ops.duoserve.dual_sparse_linear
    args = (packed.bitmap, packed.offsets, packed.values)
    shifted = packed.offsets.clone()
    shifted.view(-1)[-1] += 10 ** 6  # the last column's values would start far past the tensor
    with pytest.raises(RuntimeError, match="inconsistent"):
        op(x, packed.bitmap, shifted, packed.values, thr, None, packed.n, packed.k)
    with pytest.raises(RuntimeError, match="inconsistent"):
        op(x, packed.bitmap, packed.offsets, packed.values[:-2].clone(), thr, None, packed.n, packed.k)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, *args, thr, torch.zeros(packed.n - 1, dtype=x.dtype), packed.n, packed.k)
    with pytest.raises(RuntimeError, match="threshold must hold one number"):
        op(x, *args, torch.zeros(3), None, packed.n, packed.k)
    big = x.new_zeros(300, packed.k)  # the tiled path checks the same
    with pytest.raises(RuntimeError, match="bias must be"):
        op(big, *args, thr, torch.zeros(packed.n + 5, dtype=x.dtype), packed.n, packed.k)


def test_one_kernel_switch_with_checked_values():
    """DUOSERVE_KERNEL=reference runs the reference without loading the CPU extension (and says so);
    a misspelt value stops the import with the variable's name instead of being ignored."""
    code = ("import torch\n"
            "from duoserve.kernels import cpu, dual_sparse_linear, kernel_backend, pack_dense\n"
            "assert not cpu.available() and 'DUOSERVE_KERNEL=reference' in cpu.import_error()\n"
            "print(kernel_backend('cpu', torch.bfloat16))\n"
            "w = torch.randn(33, 77); x = torch.randn(2, 77)\n"
            "torch.testing.assert_close(dual_sparse_linear(x, pack_dense(w), 0.0), x @ w.t(), rtol=1e-5, atol=1e-5)\n")
    ok = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DUOSERVE_KERNEL": "reference"},
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "reference (DUOSERVE_KERNEL=reference)" in ok.stdout, ok.stderr[-3000:]
    assert "extension not built" not in ok.stderr  # no warning: it was asked for
    bad = subprocess.run([sys.executable, "-c", "import duoserve.kernels"], env={**os.environ, "DUOSERVE_KERNEL": "refrence"},
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "DUOSERVE_KERNEL must be one of native, reference" in bad.stderr, bad.stderr[-2000:]
