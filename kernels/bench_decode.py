"""Decode-step benchmark: a plain-torch Llama layer stack, dense linears vs the dual-sparse op.

    python -m duoserve.kernels.bench_decode --device cuda            # Llama-2-7B shapes, 4 layers
    python -m duoserve.kernels.bench_decode --device cpu --hidden 256 --inter 688 --heads 4

One decode step at batch 1: per layer RMSNorm -> q/k/v -> rotary embedding -> write the new k/v
into a small KV cache at position `pos` -> attention over the cache (positions > pos masked) ->
o_proj -> residual -> RMSNorm -> gate/up -> SiLU(gate) * up -> down -> residual. All 7
projections go through `dual_sparse_linear` (packed weights, per-projection thresholds) or
`torch.matmul` on the same pruned weights stored dense. Everything is fixed-shape and reads `pos`
from a device tensor, so on CUDA each variant is captured as one CUDA graph and replayed (what
vLLM does for decode). Weights are random (speed depends on shapes and sparsity); thresholds are
calibrated on this stack's own activations so that a fraction p_x of each projection's inputs is
dropped. Correctness: the dual stack is compared with the same stack computed by the fp32 oracle
(masking included), step by step.
"""
from __future__ import annotations

import argparse
import logging
import math
import os

import torch

from . import cli_args, dual_sparse_linear, pack_dense
from .bench import Timer, machine
from .reference import dual_sparse_linear_reference

log = logging.getLogger(__name__)
PROJ = ["q", "k", "v", "o", "gate", "up", "down"]


class Stack:
    """Weights, thresholds, KV cache and the decode step of a few Llama layers (batch 1)."""

    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        h, f, nh = args.hidden, args.inter, args.heads
        self.hd = h // nh
        g = torch.Generator(device=device).manual_seed(0)
        shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (f, h), "up": (f, h),
                  "down": (h, f)}
        self.w, self.packed, self.thr = [], [], []
        for _ in range(args.layers):
            layer = {}
            for name, (n, k) in shapes.items():
                w = torch.randn(n, k, generator=g, device=device, dtype=dtype) / math.sqrt(k)
                w.masked_fill_(torch.rand(n, k, generator=g, device=device) < args.p_w, 0)
                layer[name] = w  # [N, K] pruned weight, zeros in place
            self.w.append(layer)
        self.norm = torch.ones(h, device=device, dtype=dtype)
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2, device=device).float() / self.hd))
        ang = torch.arange(args.ctx, device=device).float()[:, None] * inv[None, :]  # [ctx, hd/2]
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)
        self.cache = torch.randn(args.layers, 2, nh, args.ctx, self.hd, generator=g, device=device,
                                 dtype=dtype) * 0.5  # [L, k|v, heads, ctx, hd]
        self.pos = torch.tensor([args.ctx // 2], device=device)  # [1] current position
        self.x = torch.randn(1, h, generator=g, device=device, dtype=dtype)  # [1, H]

    def calibrate(self):
        """Thresholds at the p_x quantile of each projection's input, from one dense step."""
        seen: list[dict] = [{} for _ in range(self.args.layers)]

        def record(li, name, a):
            seen[li][name] = a.float().abs().flatten()  # [K]
            return self.dense(li, name, a)

        self.step(record, cache=self.cache.clone())
        for li in range(self.args.layers):
            thr = {name: torch.quantile(seen[li][name], self.args.p_x).reshape(()) for name in PROJ}
            self.thr.append(thr)
            self.packed.append({name: pack_dense(self.w[li][name]) for name in PROJ})

    def dense(self, li, name, a):
        return a @ self.w[li][name].t()

    def dual(self, li, name, a):
        return dual_sparse_linear(a, self.packed[li][name], self.thr[li][name])

    def oracle(self, li, name, a):
        return dual_sparse_linear_reference(a, self.w[li][name], self.thr[li][name])

    def _rms(self, a):
        return (a.float() * torch.rsqrt(a.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(a.dtype) * self.norm

    def _rope(self, t):  # t [heads, hd] at position pos
        cos, sin = self.cos[self.pos], self.sin[self.pos]  # [1, hd/2]
        t1, t2 = t[..., : self.hd // 2], t[..., self.hd // 2:]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], -1)

    def step(self, lin, cache=None) -> torch.Tensor:
        """One decode step: x [1, H] -> [1, H]; writes k/v at pos into `cache`."""
        cache = self.cache if cache is None else cache
        nh, ctx = self.args.heads, self.args.ctx
        x = self.x
        valid = torch.arange(ctx, device=self.device) <= self.pos  # [ctx] positions <= pos
        for li in range(self.args.layers):
            a = self._rms(x)
            q = self._rope(lin(li, "q", a).view(nh, self.hd))  # [heads, hd]
            k = self._rope(lin(li, "k", a).view(nh, self.hd))
            v = lin(li, "v", a).view(nh, self.hd)
            cache[li, 0].index_copy_(1, self.pos, k[:, None, :])
            cache[li, 1].index_copy_(1, self.pos, v[:, None, :])
            scores = torch.einsum("hd,hcd->hc", q.float(), cache[li, 0].float()) / math.sqrt(self.hd)
            scores = scores.masked_fill(~valid, float("-inf")).softmax(-1)  # [heads, ctx]
            att = torch.einsum("hc,hcd->hd", scores, cache[li, 1].float()).to(self.dtype)
            x = x + lin(li, "o", att.reshape(1, -1))
            a = self._rms(x)
            x = x + lin(li, "down", torch.nn.functional.silu(lin(li, "gate", a)) * lin(li, "up", a))
        return x


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=cli_args.device, default="cuda", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--layers", type=cli_args.positive_int, default=4)
    ap.add_argument("--hidden", type=cli_args.positive_int, default=4096)
    ap.add_argument("--inter", type=cli_args.positive_int, default=11008)
    ap.add_argument("--heads", type=cli_args.positive_int, default=32)
    ap.add_argument("--ctx", type=cli_args.positive_int, default=256, help="KV cache length")
    ap.add_argument("--p_w", type=cli_args.fraction, default=0.5)
    ap.add_argument("--p_x", type=cli_args.fraction, default=0.5)
    ap.add_argument("--markdown", help="append a result line to this file")
    args = ap.parse_args(argv)
    if args.hidden % args.heads:
        ap.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    if (args.hidden // args.heads) % 2:
        ap.error(f"the head size --hidden / --heads = {args.hidden // args.heads} must be even (rotary embedding)")
    logging.basicConfig(level=logging.WARNING)
    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(1)
    stack = Stack(args, device, dtype)
    stack.calibrate()

    got = stack.step(stack.dual, cache=stack.cache.clone())
    want = stack.step(stack.oracle, cache=stack.cache.clone())
    rel = float((got.float() - want.float()).norm() / want.float().norm())
    dense_out = stack.step(stack.dense, cache=stack.cache.clone())
    rel_dense = float((dense_out.float() - want.float()).norm() / want.float().norm())

    timer = Timer(device)
    caches = {name: stack.cache.clone() for name in ("dense", "dual")}
    t_dense = timer(lambda: stack.step(stack.dense, caches["dense"]))
    t_dual = timer(lambda: stack.step(stack.dual, caches["dual"]))
    dense_bytes = sum(w.numel() * w.element_size() for layer in stack.w for w in layer.values())
    packed_bytes = sum(p.nbytes() for layer in stack.packed for p in layer.values())
    graphs = "CUDA graph replay" if device.type == "cuda" else "eager, 1 thread"
    line = (f"{machine(device)} | {args.layers} layers, hidden {args.hidden}, inter {args.inter}, "
            f"heads {args.heads}, ctx {args.ctx}, {args.dtype}, p_w={args.p_w}, p_x={args.p_x} | "
            f"{graphs} | dense {t_dense * 1e3:.3f} ms | dual {t_dual * 1e3:.3f} ms | "
            f"**{t_dense / t_dual:.2f}x** | weights {dense_bytes / 2**20:.0f} -> {packed_bytes / 2**20:.0f} MiB | "
            f"rel. error vs oracle {rel:.1e} (dense-without-masking differs by {rel_dense:.1e})")
    print(line, flush=True)
    print(f"# load average {os.getloadavg()}")
    if rel > 2e-2:
        raise SystemExit(f"dual-sparse stack disagrees with the oracle: relative error {rel:.3g}")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(f"| {line} |\n")


if __name__ == "__main__":
    main()
