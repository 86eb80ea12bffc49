#!/usr/bin/env python
"""Build the markdown tables of docs/evaluation.md and its report from `duoserve eval zeroshot --json` files.

    python scripts/zeroshot_table.py "dense, in-process=runs/dense-inproc.json" \
        "dense, endpoint=runs/dense-endpoint.json" --compare "dense, in-process" "dense, endpoint"

Prints an acc table, an acc_norm table (acc_norm where the task has it, acc elsewhere), the
settings of each run (limit, data, dtype, seconds) and, for each --compare pair saved with
--save-loglikelihoods, the item-by-item agreement (mean/max |delta log-likelihood|, same prediction)
and the accuracy difference with a bound on its paired standard error (results.paired_accuracy_difference).
To regenerate the numbers themselves, run scripts/zeroshot_docs.sh (the commands it lists).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from duoserve.evaluation.zeroshot.results import (compare_loglikelihoods, markdown_header, markdown_rows,
                                                  paired_accuracy_difference)


def _load(spec: str) -> tuple[str, dict]:
    if "=" not in spec:
        sys.exit(f"expected LABEL=PATH, got {spec!r}")
    label, path = spec.rsplit("=", 1)
    p = Path(path)
    if not p.is_file():
        sys.exit(f"{p} does not exist")
    return label, json.loads(p.read_text())


def _settings_row(label: str, s: dict) -> str:
    setup, model = s["setup"], s["setup"]["model"]
    where = model.get("endpoint") and f"endpoint ({model.get('served_model')})" or f"in-process ({model.get('dtype')})"
    act = model.get("activation_mode", "as served")
    realized = setup.get("activation_sparsity_realized_mean")
    act_cell = act + (f", realized {realized:.3f}" if realized is not None else "")
    n = ", ".join(f"{r['n']}" for r in s["tasks"].values())
    return f"| {label} | {where} | {act_cell} | {setup['limit'] or 'all'} | {n} | {'/'.join(setup['data'])} | {setup['seconds']:.0f} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=PATH")
    ap.add_argument("--compare", nargs=2, action="append", default=[], metavar=("LABEL_A", "LABEL_B"))
    args = ap.parse_args(argv)
    runs = dict(_load(s) for s in args.runs)
    for metric, title in (("acc", "acc"), ("acc_norm", "acc_norm (acc for WinoGrande and BoolQ)")):
        print(f"\n**{title}**, % \n")
        print(markdown_header())
        for label, s in runs.items():
            print(markdown_rows(label, s, metric))
    print("\n**Settings**\n")
    print("| configuration | where | activation sparsity | limit | items per task | data | seconds |\n|---|---|---|---|---|---|---|")
    for label, s in runs.items():
        print(_settings_row(label, s))
    for a, b in args.compare:
        if a not in runs or b not in runs:
            sys.exit(f"--compare {a!r} {b!r}: both must be labels of the runs given")
        agreement = compare_loglikelihoods(runs[a], runs[b])
        if not agreement:
            print(f"\n(no per-item log-likelihoods to compare for {a} vs {b}: run with --save-loglikelihoods)")
            continue
        paired = paired_accuracy_difference(runs[a], runs[b], agreement)
        print(f"\n**{a} vs {b}**, item by item (acc difference in points, second minus first; its paired "
              "standard error is at most the bound shown)\n")
        print("| task | items | requests | mean abs dLL | max abs dLL | same prediction | acc difference "
              "| paired SE at most |\n|---|---|---|---|---|---|---|---|")
        for name, r in agreement.items():
            p = paired.get(name)
            diff = f"{100 * p['acc_diff']:+.2f} | {100 * p['paired_se_max']:.2f}" if p else "- | -"
            print(f"| {name} | {r['items']} | {r['requests']} | {r['mean_abs_diff']:.4f} | {r['max_abs_diff']:.3f} "
                  f"| {100 * r['same_prediction']:.1f}% | {diff} |")
        for key, title in (("avg5", "Avg-5"), ("avg7", "Avg-7")):
            if key in paired:
                print(f"| {title} | | | | | | {100 * paired[key]['acc_diff']:+.2f} | {100 * paired[key]['paired_se_max']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
