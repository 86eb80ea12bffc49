"""SASS instruction counts of the Triton decode kernels for an H100 (sm_90), without a GPU.

    python scripts/triton_sass.py                 # the decode configurations of gpu._decode_configs
    python scripts/triton_sass.py --dump DIR      # also writes each kernel's SASS there

Triton compiles for a named target with the ptxas it ships, and its nvdisasm prints the SASS, so
the instruction cost of a kernel can be read on a machine without a GPU. For every configuration
this prints the instructions of the main loop (the longest backward branch; the whole kernel for
the one-tile `compact` kernel), the weight slots one thread handles per pass (BK x 128 rows over
32 x num_warps threads) and the instructions per slot, with the most frequent opcodes. The decode
kernels are bound by issue slots, not bandwidth (docs/kernels.md, GPU results), so this is the
figure to lower; time on a GPU decides.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

KERNELS = {"pipe": "_decode_pipe_kernel", "loop": "_decode_loop_kernel", "compact": "_decode_kernel"}
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def compile_sass(kind: str, cfg: dict, block_b: int) -> str:
    from duoserve.kernels import sm90
    from duoserve.kernels import triton_kernels as tk

    constexprs = {"BLOCK_B": block_b, "BK": cfg["BK"], "CHUNK": tk.CHUNK, "HW": True}
    if kind != "compact":
        constexprs["CPS"] = cfg["CPS"]
    return sm90.sass(sm90.compile_kernel(KERNELS[kind], constexprs, cfg["num_warps"]))


def instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    """The instructions in order, and where each label points (index of the next instruction)."""
    out, labels = [], {}
    for line in sass.splitlines():
        label = LABEL.match(line)
        if label:
            labels[label.group(1)] = len(out)
            continue
        m = INSTRUCTION.search(line)
        if m:
            out.append(m.group(2))
    return out, labels


def main_loop(ins: list[str], labels: dict[str, int]) -> list[str] | None:
    """The body of the longest loop: from the target of a backward branch to the branch."""
    best = None
    for i, text in enumerate(ins):
        m = BRANCH.search(text)
        if m and labels.get(m.group(1), i + 1) <= i:
            body = ins[labels[m.group(1)]:i + 1]
            if best is None or len(body) > len(best):
                best = body
    return best


def opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P[T0-9]+\s+", "", text)  # predicate guard
    return text.split()[0].split(".")[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1, help="tokens (BLOCK_B is the next power of two)")
    ap.add_argument("--dump", default=None, help="directory for the SASS of each configuration")
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: triton is not installed (scripts/install.sh --dev installs it)", file=sys.stderr)
        return 2
    from duoserve.kernels.gpu import _decode_configs, _pow2

    block_b = _pow2(args.batch)
    print(f"sm_90 SASS, batch {args.batch} (BLOCK_B {block_b}), bf16 values; per slot = per weight "
          f"slot (present or not) of an active column, per thread")
    for cfg in _decode_configs(block_b):
        if cfg["kind"] not in KERNELS:
            continue  # fused: its loop is unrolled (static_range), no single body to count
        sass = compile_sass(cfg["kind"], cfg, block_b)
        label = ", ".join(f"{k} {v}" for k, v in cfg.items() if k != "kind")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            name = f"{cfg['kind']}-" + "-".join(f"{k}{v}" for k, v in cfg.items() if k != "kind")
            with open(os.path.join(args.dump, name + ".sass"), "w") as f:
                f.write(sass)
        ins, labels = instructions(sass)
        body = main_loop(ins, labels) if cfg["kind"] != "compact" else None
        counted = body if body is not None else ins
        slots = cfg["BK"] * 128 / (32 * cfg["num_warps"])
        ops = collections.Counter(opcode(t) for t in counted)
        top = " ".join(f"{k} {v}" for k, v in ops.most_common(10))
        where = "loop" if body is not None else "kernel"
        print(f"{cfg['kind']:8s} {label:28s} {len(ins):5d} instr, {where} {len(counted):4d} / {slots:.0f} slots "
              f"= {len(counted) / slots:5.1f} per slot | {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
