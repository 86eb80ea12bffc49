"""How much skipping the columns inactive for *every* token of a call pays at 2-16 tokens, on a real
model's activations (issue: batched decode).

    python scripts/union_active_columns.py CKPT [--data wiki] [--sequences 32] [--length 128]
                                           [--tokens 1,2,4,8,16] [--draws 64] [--time] [--markdown F]

CKPT is a duoserve checkpoint with activation thresholds. The script runs the pruned model (in-process,
activations dense: the inputs each linear would see before its threshold) on `--sequences` windows of
held-out text (`--data`, as `duoserve eval ppl` reads it), records every target linear's input, and
for a call of T tokens reports the fraction of input columns active for at least one token (|x| > t):
- "decode": T tokens from T different sequences at the same position (what a decode step batches),
- "prefill": T consecutive tokens of one sequence (a prompt chunk),
- "independent": 1 - prod(1 - a_t), what T independent masks with the measured per-token activity
  a_t would give (the bound the kernel benchmark's random inputs assume).
Averages are over `--draws` random calls per linear, then over the linears of each kind (the q/k/v
inputs are one). With `--time`, it also times the op on each kind's real weight and real decode
batches, weights from DRAM (enough packed copies to fill 512 MiB), one thread: the measured
walk-all policy (skip the union's inactive columns where that is faster) against walking every
column (`cpu.set_walk_all(2, 0)`), alternated rounds, medians.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger("union_active_columns")
KINDS = {"q_proj": "attn in (q/k/v)", "k_proj": None, "v_proj": None, "o_proj": "o_proj",
         "gate_proj": "mlp in (gate/up)", "up_proj": None, "down_proj": "down_proj"}


def record_inputs(ckpt: Path, data: str, sequences: int, length: int):
    """{module: inputs [S, L, K] fp32}, {module: threshold}, {module: dense weight} of every target linear
    whose kind is listed in KINDS (one per shared input)."""
    from duoserve.evaluation.texts import evaluation_tokens
    from duoserve.prune.pruned_models import load_pruned_model

    model, tokenizer, loaded = load_pruned_model(ckpt, activation_mode="off", dtype="float32")
    ids, source = evaluation_tokens(data, tokenizer)  # [N] int64
    usable = ids.numel() // length
    if usable < sequences:
        raise SystemExit(f"{data}: {usable} windows of {length} tokens, fewer than --sequences {sequences}")
    windows = ids[: sequences * length].view(sequences, length)  # [S, L]
    inputs: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    hooks = []
    for name, module in model.named_modules():
        if name in loaded.thresholds and KINDS.get(name.rsplit(".", 1)[-1]):
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: inputs[name].append(args[0].detach().float())))
    with torch.no_grad():
        for s in range(sequences):
            model(windows[s:s + 1])
    for h in hooks:
        h.remove()
    weights = {name: loaded.state_dict[name + ".weight"] for name in inputs}
    log.info("recorded %d linears on %d x %d tokens of %s", len(inputs), sequences, length, source)
    return {n: torch.cat(v) for n, v in inputs.items()}, loaded.thresholds, weights, source


def activity(x: torch.Tensor, t: float, tokens: int, draws: int, gen: torch.Generator) -> dict[str, float]:
    """x [S, L, K]: mean fraction of columns active for some token of a T-token call, three ways."""
    S, L, K = x.shape
    active = x.abs() > t  # [S, L, K]
    per_token = active.float().mean(-1)  # [S, L]
    out = {"per_token": float(per_token.mean())}
    if tokens > S or tokens > L:
        raise SystemExit(f"--tokens {tokens} needs at least that many sequences and positions")
    dec, pre, ind = [], [], []
    for _ in range(draws):
        seqs = torch.randperm(S, generator=gen)[:tokens]
        pos = int(torch.randint(L, (1,), generator=gen))
        dec.append(float(active[seqs, pos].any(0).float().mean()))
        s, p0 = int(torch.randint(S, (1,), generator=gen)), int(torch.randint(L - tokens + 1, (1,), generator=gen))
        pre.append(float(active[s, p0:p0 + tokens].any(0).float().mean()))
        ind.append(1.0 - float(torch.prod(1.0 - per_token[seqs, pos])))
    out.update(decode=statistics.mean(dec), prefill=statistics.mean(pre), independent=statistics.mean(ind))
    return out


def time_union(weight: torch.Tensor, x: torch.Tensor, t: float, tokens: int, rounds: int,
               gen: torch.Generator) -> tuple[float, float]:
    """Median per-call ms of the op on decode batches of real inputs: (measured policy, walk every column)."""
    from duoserve.kernels import cpu, pack_dense

    packed = pack_dense(weight.bfloat16())
    copies = [packed] + [pack_dense(weight.bfloat16()) for _ in range(max(1, (512 << 20) // packed.nbytes() - 1))]
    S, L, K = x.shape
    batches = [x[torch.randperm(S, generator=gen)[:tokens], int(torch.randint(L, (1,), generator=gen))].bfloat16()
               for _ in range(len(copies))]  # a different real batch per copy
    thr = torch.tensor(t, dtype=torch.float32)
    op = torch.ops.duoserve.dual_sparse_linear

    def per_call() -> float:
        start = time.perf_counter()
        for p, xb in zip(copies, batches):
            op(xb, p.bitmap, p.offsets, p.values, thr, None, p.n, p.k)
        return (time.perf_counter() - start) / len(copies) * 1e3

    times = {"measured": [], "walk_all": []}
    try:
        for r in range(rounds):
            for mode in (("measured", "walk_all") if r % 2 == 0 else ("walk_all", "measured")):
                cpu.set_walk_all(None) if mode == "measured" else cpu.set_walk_all(2.0, 0.0)
                per_call()
                times[mode].append(per_call())
    finally:
        cpu.set_walk_all(None)
    return statistics.median(times["measured"]), statistics.median(times["walk_all"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", default="wiki", help="held-out text, as `duoserve eval ppl --data` takes it")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--tokens", default="1,2,4,8,16")
    ap.add_argument("--draws", type=int, default=64)
    ap.add_argument("--time", action="store_true", help="also time the op (measured policy vs walk all)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        ap.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if not args.checkpoint.is_dir():
        ap.error(f"{args.checkpoint} is not a checkpoint folder")
    if min(tokens) < 1 or args.sequences < max(tokens) or args.length < max(tokens):
        ap.error("--tokens must be >= 1 and at most --sequences and --length")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(1 if args.time else os.cpu_count() or 1)
    inputs, thresholds, weights, source = record_inputs(args.checkpoint, args.data, args.sequences, args.length)
    by_kind: dict[str, list[str]] = collections.defaultdict(list)
    for name in inputs:
        by_kind[KINDS[name.rsplit(".", 1)[-1]]].append(name)

    lines = [f"checkpoint `{args.checkpoint.name}`, text: {source}, {args.sequences} x {args.length} tokens, "
             f"{args.draws} calls per linear and T; fraction of input columns active for some token of the call",
             "", "| linear input | T | per token | decode batch | prefill chunk | independent masks |"
             + (" op ms, measured policy | op ms, walk all | walk all / measured |" if args.time else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|" if args.time else "")]
    gen = torch.Generator().manual_seed(0)
    for kind, names in by_kind.items():
        for t in tokens:
            stats = [activity(inputs[n], thresholds[n], t, args.draws, gen) for n in names]
            mean = {k: statistics.mean(s[k] for s in stats) for k in stats[0]}
            row = (f"| {kind} ({len(names)} layers) | {t} | {mean['per_token']:.3f} | {mean['decode']:.3f} | "
                   f"{mean['prefill']:.3f} | {mean['independent']:.3f} |")
            if args.time:
                mid = names[len(names) // 2]  # one layer from the middle, its real weight and inputs
                measured, walk_all = time_union(weights[mid], inputs[mid], thresholds[mid], t, args.rounds, gen)
                row += f" {measured:.3f} | {walk_all:.3f} | {walk_all / measured:.2f} |"
            lines.append(row)
            print(row, flush=True)
    text = "\n".join(lines) + "\n"
    if args.markdown:
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
