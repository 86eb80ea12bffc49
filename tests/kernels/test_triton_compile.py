"""Every Triton kernel compiles for an H100 (sm_90) down to a cubin, on this GPU-less machine.

The interpreter tests (test_triton_interpret.py) check what the kernels compute but never run
Triton's GPU compiler, which rejects things the interpreter accepts (layouts, atomics, sort,
register limits). Triton compiles for a named target without a device, with the ptxas it ships."""
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")

CASES = [  # kernel name (sm90.SIGNATURES), constexprs, warps (the default decode config first)
    ("_decode_pipe_kernel", {"BLOCK_B": 1, "BK": 16, "CPS": 2, "CHUNK": 256, "HW": True}, 2),
    ("_decode_pipe_kernel", {"BLOCK_B": 8, "BK": 4, "CPS": 4, "CHUNK": 256, "HW": True}, 2),
    ("_decode_loop_kernel", {"BLOCK_B": 1, "BK": 32, "CPS": 1, "CHUNK": 256, "HW": True}, 4),
    ("_decode_kernel", {"BLOCK_B": 1, "BK": 16, "CHUNK": 256, "HW": True}, 2),
    ("_decode_kernel", {"BLOCK_B": 2, "BK": 16, "CHUNK": 256, "HW": True}, 4),
    ("_decode_fused_kernel", {"BLOCK_B": 1, "C": 128, "BK": 32, "HAS_BIAS": True, "HW": True}, 4),
    ("_unpack_kernel", {"BK": 32, "HW": True}, 4),
    ("_compact_kernel", {"BLOCK_B": 1, "CHUNK": 256, "ZERO_BLOCK": 256}, 4),
    ("_gemm_kernel", {"BT": 16, "BK": 32, "HAS_BIAS": True, "ATOMIC": False, "DOT_F32": False, "HW": True}, 4),
    ("_gemm_kernel_atomic", {"BT": 32, "BK": 64, "HAS_BIAS": False, "ATOMIC": True, "DOT_F32": False,
                             "HW": True}, 8),
]


@pytest.mark.parametrize("name,constexprs,warps", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_compiles_for_sm90(name, constexprs, warps):
    from duoserve.kernels import sm90, triton_kernels

    assert not triton_kernels.INTERPRET, "run without TRITON_INTERPRET (hardware popcount path)"
    assert sm90.compile_kernel(name, constexprs, warps).asm["cubin"], "no cubin"


def test_sass_counts_find_the_main_loop_of_the_default_decode_kernel():
    """scripts/triton_sass.py's reading of nvdisasm output: the body between a backward branch and
    its target, on the default decode configuration's real SASS."""
    from script_module import load_script

    from duoserve.kernels import sm90

    script = load_script("triton_sass")
    text = sm90.sass(sm90.compile_kernel(CASES[0][0], CASES[0][1], CASES[0][2]))
    ins, labels = script.instructions(text)
    body = script.main_loop(ins, labels)
    assert body is not None and 100 < len(body) < len(ins)
    assert any(script.opcode(t) == "LDG" for t in body) and script.opcode(body[-1]) == "BRA"
