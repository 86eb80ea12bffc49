"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU: Triton compiles for a
named target with the ptxas it ships, and its nvdisasm prints the SASS. Used by the compile test
(tests/kernels/test_triton_compile.py) and the instruction counts of scripts/triton_sass.py.
Imports triton when called (never under TRITON_INTERPRET: the interpreter path differs)."""
from __future__ import annotations

import os
import subprocess
import tempfile

_LISTS = {"idx_ptr": "*i32", "xc_ptr": "*fp32", "count_ptr": "*i32"}
_LAYOUT = {"bitmap_ptr": "*i32", "offsets_ptr": "*i32", "values_ptr": "*bf16"}
_LOOP = {**_LISTS, **_LAYOUT, "out_ptr": "*fp32", "T": "i32", "N": "i32", "K": "i32", "NUM_CHUNKS": "i32"}
_GEMM = {"x_ptr": "*bf16", "thr_ptr": "*fp32", **_LAYOUT, "bias_ptr": "*bf16", "y_ptr": "*bf16",
         "T": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32"}
# the runtime arguments' types of each kernel (bf16 weights); constexprs are given per call
SIGNATURES = {
    "_decode_pipe_kernel": _LOOP,
    "_decode_loop_kernel": _LOOP,
    "_decode_kernel": {**_LISTS, **_LAYOUT, "out_ptr": "*fp32", "T": "i32", "N": "i32", "K": "i32"},
    "_decode_fused_kernel": {"x_ptr": "*bf16", "thr_ptr": "*fp32", **_LAYOUT, "bias_ptr": "*bf16",
                             "y_ptr": "*bf16", "ws_ptr": "*fp32", "arrived_ptr": "*i32", "T": "i32", "N": "i32",
                             "K": "i32", "NUM_CHUNKS": "i32"},
    "_unpack_kernel": {**_LAYOUT, "wt_ptr": "*bf16", "RB0": "i32", "K": "i32", "ROWS": "i32"},
    "_compact_kernel": {"x_ptr": "*bf16", "thr_ptr": "*fp32", "idx_ptr": "*i32", "xc_ptr": "*fp32",
                        "count_ptr": "*i32", "out_ptr": "*fp32", "T": "i32", "K": "i32", "OUT_NUMEL": "i32"},
    "_gemm_kernel": _GEMM,
    "_gemm_kernel_atomic": {**_GEMM, "y_ptr": "*fp32"},  # ATOMIC = True: fp32 partial sums
}


def compile_kernel(name: str, constexprs: dict, num_warps: int):
    """triton_kernels.<name> (a SIGNATURES key; `_gemm_kernel_atomic` is _gemm_kernel with an fp32
    output) compiled for sm_90 with these constexprs; the result's .asm["cubin"] is the binary."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import triton_kernels

    fn = getattr(triton_kernels, name.removesuffix("_atomic"))
    sig = {**SIGNATURES[name], **{k: "constexpr" for k in constexprs}}
    missing = set(fn.arg_names) - set(sig)
    if missing:
        raise ValueError(f"{name}: no type for {sorted(missing)} (sm90.SIGNATURES or the constexprs)")
    src = triton.compiler.ASTSource(fn=fn, signature={a: sig[a] for a in fn.arg_names},
                                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def sass(compiled) -> str:
    """The SASS of a compile_kernel result, printed by the nvdisasm Triton ships."""
    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([nvdisasm, "-c", path], check=True, capture_output=True, text=True).stdout
