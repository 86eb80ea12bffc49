"""duoserve.kernels: the dual-sparse linear op y = W @ where(|x| > t, x, 0) + bias.

W is unstructured-sparse (pruned weights are zero) and x is sparsified at run time by a
per-layer threshold t. Imports only torch (and triton, lazily, on CUDA).

API (stable; changes are written here first):
    pack_dense(weight [N, K]) -> PackedWeight             zeros where pruned; runs on W's device
    pack_bitmask(bitmask uint8 [N, ceil(K/8)], values [nnz], (N, K)) -> PackedWeight
                                                          the checkpoint's on-disk encoding
    PackedWeight: .tensors() -> {"bitmap", "offsets", "values"}, ints .n .k,
                  PackedWeight.from_tensors(tensors, n, k, check=False), .check_index(),
                  .nbytes(), .to(device, dtype)
    dual_sparse_linear(x [..., K], packed, threshold, bias=None) -> [..., N] in x.dtype
                  threshold: fp32 0-dim tensor (preferred: no host->device copy) or float;
                  bf16 / fp32 on CPU and CUDA, fp16 on CUDA (on CPU fp16 runs the
                  decompress + fp32 matmul path)
    dual_sparse_linear_reference(x, dense_weight, threshold, bias=None)   fp32 oracle
    torch.ops.duoserve.dual_sparse_linear(x [T, K], bitmap, offsets, values, threshold, bias, n, k)
                  the registered custom op (fake impl included) behind dual_sparse_linear
    kernel_backend(device, dtype) -> str                  what runs the op there, in words
Quantized values (int4/int8 codes, per-group fp16 scales; qlayout.py, qops.py):
    pack_quantized(bitmask, codes [nnz], scales [N, ceil(K/G)], (N, K), bits, group_size) -> QPackedWeight
    pack_quantized_dense(codes [N, K], mask [N, K], scales, bits, group_size) -> QPackedWeight
    dual_sparse_linear_q(x, qpacked, threshold, bias=None); dual_sparse_linear_q_reference (fp32 oracle
                  on the dequantized weight); torch.ops.duoserve.dual_sparse_linear_q (custom op)
Importing this package loads the native CPU extension when it is built (it registers the op's
CPU kernel in C++); without it, CPU calls use the reference with one logged warning.
Layout, dispatch and benchmarks: docs/kernels.md.
"""
from .layout import BLOCK_ROWS, PackedWeight, pack_bitmask, pack_dense, unpack_dense
from .ops import dual_sparse_linear, dual_sparse_linear_op, kernel_backend
from .qlayout import QPackedWeight, pack_quantized, pack_quantized_dense, unpack_dequantized
from .qops import dual_sparse_linear_q, dual_sparse_linear_q_op, dual_sparse_linear_q_reference, kernel_backend_q
from .reference import dual_sparse_linear_packed_reference, dual_sparse_linear_reference

__all__ = [
    "BLOCK_ROWS",
    "PackedWeight",
    "pack_bitmask",
    "pack_dense",
    "unpack_dense",
    "dual_sparse_linear",
    "dual_sparse_linear_op",
    "kernel_backend",
    "dual_sparse_linear_reference",
    "dual_sparse_linear_packed_reference",
    "QPackedWeight",
    "pack_quantized",
    "pack_quantized_dense",
    "unpack_dequantized",
    "dual_sparse_linear_q",
    "dual_sparse_linear_q_op",
    "dual_sparse_linear_q_reference",
    "kernel_backend_q",
]
