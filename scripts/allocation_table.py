#!/usr/bin/env python
"""Greedy vs uniform activation-sparsity allocation at equal average p_x: perplexity table.

For a checkpoint with a greedy allocation table (`duoserve allocate CKPT`), loads the pruned model
once and, for every P of --px, evaluates perplexity with the uniform rule (every linear at P) and
with the greedy table (K*N-weighted average P), through the same code as `duoserve eval ppl`
(evaluation texts, windows, threshold mode), plus activation sparsity off once. Each row also
reports the realized K*N-weighted mean p_x on the evaluated text (the thresholds were calibrated
on other text, so it drifts a little from P), and the greedy table's block-error ratio on its
calibration windows (from the metadata). Prints a Markdown table; --json keeps everything.

The greedy table realizes a little less than P where it sets a linear far from the p_x its
upstream linears have (each grid threshold was calibrated with the linears before it at the same
p_x), so --match-realized adds, per P, the uniform rule at P + (greedy's realized - uniform's
realized): the uniform model that skips as many weight columns as the greedy one did.
--matched-from JSON takes the uniform and greedy rows of an earlier run and evaluates only those.

    OMP_NUM_THREADS=1 DUOSERVE_WIKITEXT2=PATH/wiki.test.raw \\
        python scripts/allocation_table.py CKPT --px 0.3,0.5 --max-windows 5 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def evaluate(model, windows, thresholds):
    """PPL with `thresholds` installed (None: activation sparsity off) and the realized p_x."""
    from duoserve.evaluation.perplexity import perplexity
    from duoserve.prune.pruned_models import install_activation_sparsity

    old = getattr(model, "duoserve_sparsity", None)
    if old is not None:
        old.__exit__(None, None, None)
    targets = tuple(sorted({n.rsplit(".", 1)[-1] for n in (thresholds or {"x.q_proj": 0})}))
    sparsity = install_activation_sparsity(model, "threshold" if thresholds else "off", targets=targets,
                                           thresholds=thresholds)
    t0 = time.time()
    result = perplexity(model, windows, desc="ppl")
    result["seconds"] = round(time.time() - t0, 1)
    if sparsity is not None:
        realized = sparsity.realized()
        size = {n: m.in_features * m.out_features for n, m in sparsity.modules.items()}
        result["realized_weighted"] = sum(realized[n] * size[n] for n in realized) / sum(size[n] for n in realized)
        result["realized_min"], result["realized_max"] = min(realized.values()), max(realized.values())
        sparsity.__exit__(None, None, None)
        model.duoserve_sparsity = None
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--px", default="0.3,0.5", help="average p_x to compare at (default 0.3,0.5)")
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-off", action="store_true", help="skip the activation-sparsity-off row")
    p.add_argument("--match-realized", action="store_true",
                   help="add a uniform row at the nominal p_x that realizes what greedy realized")
    p.add_argument("--matched-from", type=Path, default=None,
                   help="reuse the rows of this earlier --json and evaluate only the realized-matched ones")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    import torch

    from duoserve.evaluation.perplexity import make_windows
    from duoserve.evaluation.texts import evaluation_tokens
    from duoserve.format.allocation_table import weighted_mean_px
    from duoserve.format.thresholds import allocated_px, select_thresholds
    from duoserve.prune.architectures import bos_for
    from duoserve.prune.pruned_models import load_pruned_model

    torch.manual_seed(0)
    model, tokenizer, ckpt = load_pruned_model(args.checkpoint, activation_mode="off", dtype=args.dtype)
    q = ckpt.qconfig
    alloc = q.activation_sparsity.allocation
    ids, desc = evaluation_tokens(args.data, tokenizer)
    windows = make_windows(ids, args.seqlen, bos_for(model, tokenizer), args.max_windows)

    def pair(px: float) -> list[dict]:
        """The uniform and the greedy row at average p_x `px`."""
        out = []
        for allocation in ("uniform", "greedy"):
            row = {"px": px, "allocation": allocation,
                   **evaluate(model, windows, select_thresholds(q, px, args.checkpoint, allocation))}
            if allocation == "greedy":
                per = allocated_px(q, px)
                row["table_weighted"] = weighted_mean_px(q.modules, per)
                row["table_min"], row["table_max"] = min(per.values()), max(per.values())
                ratio = (alloc.info.get("block_error_greedy_vs_uniform") or {}).get(f"{px:g}")
                if ratio:
                    row["calib_block_error_ratio"] = ratio[0] / ratio[1]
            out.append(row)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
        return out

    pxs = [float(x) for x in args.px.split(",")]
    if args.matched_from:
        rows = [r for r in json.loads(args.matched_from.read_text())["rows"]
                if r["allocation"] != "uniform (realized-matched)"]
    else:
        rows = [] if args.no_off else [{"px": 0.0, "allocation": "off", **evaluate(model, windows, None)}]
        for px in pxs:
            rows += pair(px)
    if args.match_realized or args.matched_from:
        for px in pxs:
            u = next(r for r in rows if r["px"] == px and r["allocation"] == "uniform")
            g = next(r for r in rows if r["px"] == px and r["allocation"] == "greedy")
            p_u = round(px + g["realized_weighted"] - u["realized_weighted"], 4)
            row = {"px": p_u, "for_px": px, "allocation": "uniform (realized-matched)",
                   **evaluate(model, windows, select_thresholds(q, p_u, args.checkpoint))}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
    rows.sort(key=lambda r: (r.get("for_px", r["px"]), ["off", "uniform", "greedy",
                                                         "uniform (realized-matched)"].index(r["allocation"])))
    print(f"\n{args.checkpoint.name}: {desc}, {windows.shape[0]} x {args.seqlen} tokens, {args.dtype}; "
          f"host {_cpu()}, torch threads {torch.get_num_threads()}\n")
    print("| avg p_x | allocation | PPL | realized p_x (K*N-weighted) | per-linear p_x range | "
          "calib. block error greedy/uniform |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rng = (f"{r['table_min']:.2f}-{r['table_max']:.2f}" if "table_min" in r
               else ("-" if r["allocation"] == "off" else f"{r['px']:g}"))
        ratio = f"{r['calib_block_error_ratio']:.2f}" if "calib_block_error_ratio" in r else "-"
        real = f"{r['realized_weighted']:.3f}" if "realized_weighted" in r else "0"
        print(f"| {r['px']:g} | {r['allocation']} | {r['ppl']:.2f} | {real} | {rng} | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "data": desc, "seqlen": args.seqlen,
                                         "windows": int(windows.shape[0]), "dtype": args.dtype, "host": _cpu(),
                                         "threads": torch.get_num_threads(), "allocation_info": alloc.info,
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
