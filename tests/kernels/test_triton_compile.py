"""Every Triton kernel compiles for an H100 (sm_90) down to a cubin, on this GPU-less machine.

The interpreter tests (test_triton_interpret.py) check what the kernels compute but never run
Triton's GPU compiler, which rejects things the interpreter accepts (layouts, atomics, sort,
register limits). Triton compiles for a named target without a device, with the ptxas it ships."""
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")

LISTS = {"idx_ptr": "*i32", "xc_ptr": "*fp32", "count_ptr": "*i32"}
LAYOUT = {"bitmap_ptr": "*i32", "offsets_ptr": "*i32", "values_ptr": "*bf16"}
LOOP = {**LISTS, **LAYOUT, "out_ptr": "*fp32", "T": "i32", "N": "i32", "K": "i32", "NUM_CHUNKS": "i32"}
TILE = {**LISTS, **LAYOUT, "out_ptr": "*fp32", "T": "i32", "N": "i32", "K": "i32"}
FUSED = {"x_ptr": "*bf16", "thr_ptr": "*fp32", **LAYOUT, "bias_ptr": "*bf16", "y_ptr": "*bf16",
         "ws_ptr": "*fp32", "arrived_ptr": "*i32", "T": "i32", "N": "i32", "K": "i32", "NUM_CHUNKS": "i32"}
GEMM = {"x_ptr": "*bf16", "thr_ptr": "*fp32", **LAYOUT, "bias_ptr": "*bf16", "y_ptr": "*bf16",
        "T": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32"}
UNPACK = {**LAYOUT, "wt_ptr": "*bf16", "RB0": "i32", "K": "i32", "ROWS": "i32"}
COMPACT = {"x_ptr": "*bf16", "thr_ptr": "*fp32", "idx_ptr": "*i32", "xc_ptr": "*fp32",
           "count_ptr": "*i32", "out_ptr": "*fp32", "T": "i32", "K": "i32", "OUT_NUMEL": "i32"}

CASES = [  # kernel name, runtime signature, constexprs, warps (the default decode config first)
    ("_decode_pipe_kernel", LOOP, {"BLOCK_B": 1, "BK": 16, "CPS": 2, "CHUNK": 256, "HW": True}, 2),
    ("_decode_pipe_kernel", LOOP, {"BLOCK_B": 8, "BK": 4, "CPS": 4, "CHUNK": 256, "HW": True}, 2),
    ("_decode_loop_kernel", LOOP, {"BLOCK_B": 1, "BK": 32, "CPS": 1, "CHUNK": 256, "HW": True}, 4),
    ("_decode_kernel", TILE, {"BLOCK_B": 1, "BK": 16, "CHUNK": 256, "HW": True}, 2),
    ("_decode_kernel", TILE, {"BLOCK_B": 2, "BK": 16, "CHUNK": 256, "HW": True}, 4),
    ("_decode_fused_kernel", FUSED, {"BLOCK_B": 1, "C": 128, "BK": 32, "HAS_BIAS": True, "HW": True}, 4),
    ("_unpack_kernel", UNPACK, {"BK": 32, "HW": True}, 4),
    ("_compact_kernel", COMPACT, {"BLOCK_B": 1, "CHUNK": 256, "ZERO_BLOCK": 256}, 4),
    ("_gemm_kernel", GEMM, {"BT": 16, "BK": 32, "HAS_BIAS": True, "ATOMIC": False, "DOT_F32": False,
                            "HW": True}, 4),
    ("_gemm_kernel", {**GEMM, "y_ptr": "*fp32"}, {"BT": 32, "BK": 64, "HAS_BIAS": False, "ATOMIC": True, "DOT_F32": False,
                            "HW": True}, 8),
]


@pytest.mark.parametrize("name,signature,constexprs,warps", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_compiles_for_sm90(name, signature, constexprs, warps):
    import triton
    from triton.backends.compiler import GPUTarget

    from duoserve.kernels import triton_kernels

    assert not triton_kernels.INTERPRET, "run without TRITON_INTERPRET (hardware popcount path)"
    fn = getattr(triton_kernels, name)
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    missing = set(fn.arg_names) - set(sig)
    assert not missing, f"test signature lacks {missing}"
    src = triton.compiler.ASTSource(fn=fn, signature={a: sig[a] for a in fn.arg_names},
                                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"], "no cubin"
