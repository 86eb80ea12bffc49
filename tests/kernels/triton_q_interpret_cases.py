"""The quantized Triton GEMM (kernels/triton_q.py) under TRITON_INTERPRET=1 on CPU tensors against
the fp32 oracle on the dequantized weight; exit 1 on a mismatch. Started as a subprocess by
test_triton_interpret.py (the variable must be set before triton is imported)."""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from duoserve.kernels import dual_sparse_linear_q_reference, pack_quantized_dense  # noqa: E402
from duoserve.kernels import triton_q  # noqa: E402


def main() -> int:
    assert triton_q.INTERPRET
    torch.set_num_threads(1)
    failures = 0
    # (n, k, group, p_w, tokens): K not a multiple of G nor of BK, one and several row blocks
    cases = [(33, 77, 16, 0.5, 1), (130, 200, 64, 0.5, 3), (33, 96, 32, 0.0, 17), (16, 64, 8, 1.0, 2),
             (130, 77, 8, 0.9, 5)]
    for bits in (4, 8):
        for n, k, group, p_w, tokens in cases:
            for dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(n + k + bits)
                mask = torch.rand(n, k, generator=g) >= p_w
                mask[:, 3] = False  # an empty column
                codes = torch.randint(0, 2 ** bits, (n, k), generator=g)
                scales = (torch.rand(n, -(-k // group), generator=g) * 0.05 + 1e-3).half()
                q = pack_quantized_dense(codes, mask, scales, bits, group)
                x = torch.randn(tokens, k, generator=g).to(dtype)
                bias = torch.randn(n, generator=g).to(dtype)
                thr = torch.tensor(0.3)
                got = triton_q.linear_q(x, q.bitmap, q.offsets, q.codes, q.scales, thr, bias, n, k, bits, group)
                want = dual_sparse_linear_q_reference(x, q, thr, bias)
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                ok = torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
                failures += not ok
                print(f"int{bits} {n}x{k} G{group} p_w {p_w} T {tokens} {dtype}: {'ok' if ok else 'MISMATCH'}",
                      flush=True)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
