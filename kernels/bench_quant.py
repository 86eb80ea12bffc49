"""`python -m duoserve.kernels.bench --int4`: the int4 dual-sparse op against dense int4 and dense.

In one run, per shape, weight sparsity, activation sparsity and batch:
- int4 dual-sparse: duoserve::dual_sparse_linear_q on random codes with a fraction p_w pruned,
  fp16 scales per group of G (128, or 64 where K is not a multiple of 128) — what a
  `duoserve prune --quantize int4` checkpoint runs;
- dense int4: torch's weight-only int4 CPU matmul (`aten._weight_int4pack_mm_for_cpu` on a weight
  packed by `aten._convert_weight_to_int4pack_for_cpu`, bf16 scales and zeros per group of G):
  the dense quantized model a user would otherwise deploy;
- dense: the run's dense baseline (`--baseline`: torch.matmul, or vLLM's CPU GEMM through
  `python -m duoserve.loaders.kernel_bench --int4 --baseline vllm`), bf16.
Speedups are of the int4 dual-sparse op over each. With `--cold-mib M` every call runs on the next
of enough copies of its weight to fill M MiB (weights from DRAM, as in a model); else warm.
"""
from __future__ import annotations

import torch

from .qlayout import QPackedWeight, pack_quantized_dense

HEADER = ("\n| shape (N x K) | p_w | p_x | batch | G | dense us | dense int4 us | int4 dual-sparse us | "
          "vs dense | vs dense int4 | int4 dual B/weight |\n|---|---|---|---|---|---|---|---|---|---|---|")


def group_for(k: int) -> int:
    return 128 if k % 128 == 0 else 64


def torch_int4(n: int, k: int, group: int, seed: int = 0):
    """A random dense int4 weight in torch's CPU int4 layout: x [B, K] bf16 -> x @ Wq.T."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    scales = torch.rand(k // group, n, generator=g) * 0.01 + 1e-3
    sz = torch.stack([scales, torch.zeros_like(scales)], -1).to(torch.bfloat16).contiguous()  # [K/G, N, 2]
    return packed, sz


def quantized_weight(n: int, k: int, p_w: float, group: int, seed: int = 0) -> QPackedWeight:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) >= p_w
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales = (torch.rand(n, -(-k // group), generator=g) * 0.01 + 1e-3).half()
    return pack_quantized_dense(codes, mask, scales, 4, group)


def _copies(make, nbytes: int, cold_mib: float) -> list:
    import math
    count = max(2, math.ceil(cold_mib * 2**20 / nbytes)) if cold_mib else 1
    return [make() for _ in range(count)]


def run_int4(args, device, timer, sink, make_input, dense_factory, make_weight, cold_time) -> list[dict]:
    from .qops import dual_sparse_linear_q

    if device.type != "cpu":
        raise SystemExit("--int4 compares CPU kernels (torch's int4 CPU matmul); use --device cpu")
    rows = []
    dtype = torch.bfloat16
    for n, k in args.shapes:
        group = group_for(k)
        w = make_weight(n, k, 0.0, dtype, device)
        dense_fns = _copies(lambda: dense_factory(w.clone()), n * k * 2, args.cold_mib)
        i4 = _copies(lambda: torch_int4(n, k, group), n * k // 2, args.cold_mib)
        for p_w in args.pw:
            q0 = quantized_weight(n, k, p_w, group)
            qs = [q0] + _copies(lambda: QPackedWeight(q0.n, q0.k, q0.bits, q0.group_size,
                                                      *(t.clone() for t in q0.tensors().values())),
                                q0.nbytes(), args.cold_mib)[1:]
            for b in args.batch:
                x0, _ = make_input(b, k, 0.0, dtype, device)
                if args.cold_mib:
                    t_dense = cold_time([lambda f=f: f(x0) for f in dense_fns])
                    t_i4 = cold_time([lambda p=p: torch.ops.aten._weight_int4pack_mm_for_cpu(x0, p[0], group, p[1])
                                      for p in i4])
                else:
                    t_dense = timer(lambda: dense_fns[0](x0))
                    t_i4 = timer(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x0, i4[0][0], group, i4[0][1]))
                for p_x in args.px:
                    x, thr = make_input(b, k, p_x, dtype, device)
                    t = (cold_time([lambda q=q: dual_sparse_linear_q(x, q, thr) for q in qs]) if args.cold_mib
                         else timer(lambda: dual_sparse_linear_q(x, q0, thr)))
                    row = dict(n=n, k=k, p_w=p_w, p_x=p_x, batch=b, group=group, dense_us=t_dense * 1e6,
                               int4_us=t_i4 * 1e6, dual_us=t * 1e6, vs_dense=t_dense / t, vs_int4=t_i4 / t,
                               bpe=q0.bytes_per_element())
                    rows.append(row)
                    sink(f"| {n}x{k} | {p_w} | {p_x} | {b} | {group} | {row['dense_us']:.1f} | {row['int4_us']:.1f} | "
                         f"{row['dual_us']:.1f} | **{row['vs_dense']:.2f}x** | **{row['vs_int4']:.2f}x** | "
                         f"{row['bpe']:.3f} |")
                    print(f"{n:>6}x{k:<6} p_w={p_w:.1f} p_x={p_x:.1f} B={b:<3} dense {row['dense_us']:9.1f} us  "
                          f"int4 {row['int4_us']:9.1f} us  int4 dual {row['dual_us']:9.1f} us  "
                          f"x{row['vs_dense']:5.2f} vs dense  x{row['vs_int4']:5.2f} vs int4", flush=True)
            del qs
        del dense_fns, i4
    return rows
