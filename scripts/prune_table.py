#!/usr/bin/env python
"""Reproduce the pruning result tables of docs/results.md.

Every configuration is pruned with `duoserve prune` and evaluated with `duoserve eval ppl` in
subprocesses (so wall time and peak memory are those of the real commands); each result is
cached as JSON under --work, so an interrupted run resumes where it stopped.

    python scripts/prune_table.py foundation --work out/tables --markdown out/tables/foundation.md
    python scripts/prune_table.py dual       --work out/tables --markdown out/tables/dual.md
    python scripts/prune_table.py sweep      --work out/tables --markdown out/tables/sweep.md --plot docs/sweep.png

The evaluation text is --data (default wikitext2: the Hugging Face hub, else a local copy, e.g.
$DUOSERVE_WIKITEXT2; docs/evaluation.md). The tables in docs/results.md are copied from --markdown.

Suites
- foundation: dense; magnitude, Wanda, SparseGPT at 50% unstructured and 2:4 (no activation sparsity).
- dual: W50%+X50%: Wanda (dense calibration), SparseGPT (calibrated on sparsified inputs), DuoGPT;
  PPL with top-k and with calibrated-threshold activation sparsity; prune wall time and peak memory.
- sweep: p_w = p_x in 30/40/50/55/60/65% for Wanda, SparseGPT and DuoGPT, both activation modes.
- duogpt-ablation: DuoGPT's components at W50+X50 against dual-sparse SparseGPT: residual scale
  (held-out choice "auto", 0.5, 0.25, 0) with the paper's damp 0.1 + act_order and with SparseGPT's
  damp 0.01 without act_order (docs/pruning.md, "Robustness"; run it with --model for each model).
- robustness: DuoGPT at its defaults against dual-sparse SparseGPT at W = X in 40/50/60% (run it with
  --model for each model, and with a larger --nsamples for the second calibration size).
- residual-default: DuoGPT at residual scale 0 / 0.25 / 0.5 (damp 0.1, act_order) at W = X in 40/50/60%,
  the candidates scripts/residual_default.py chooses the default among (run it with --data c4-heldout).
- residual-fit: DuoGPT with --residual-fit ridge (the residual as dense weights, then SparseGPT's solve) at
  W = X in 40/50/60%, residual scales 0.25 and 0.5.
- residual-parts: DuoGPT's residual from one part of dX: --residual-upstream 0 (the dropped activations
  only; scales 0.25, 1) and --residual-dropped 0 (the earlier layers' error only; 0.25, 0.5), and the default,
  at W = X in 50/40% (run it with --data c4-heldout too).
- residual-upstream-fit: DuoGPT with --residual-dropped 0 at residual scales 0.25 and 0.5, W = X in 40/50%:
  the ladder scripts/residual_default.py --fit ...,ridge-upstream compares (run it with --data c4-heldout).
- baseline-settings: the dual-sparse baselines at W50+X50 with other settings: SparseGPT with DuoGPT's
  damp 0.1 and act_order, Wanda with norms of unsparsified and of sparsified inputs.
- duogpt-residual: DuoGPT's residual term at W50+X50 and W60+X60: --residual-scale 0 / 0.25 /
  0.5 / 1 with --residual-target running (Algorithm 1 as printed) and original (docs/pruning.md).

A configuration is (method, sparsity, p_x) or (method, sparsity, p_x, {option: value}); options
go to `duoserve prune` as --option-name value and into the cache key.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

# Cached results in the work folder and logged subprocesses: shared with `duoserve frontier`.
from duoserve.workcache import NotCached as NotRun
from duoserve.workcache import StepFailed, cached, prune_flags, run_logged

# DuoGPT's default fit, spelled out (so that the cache keys stay those of the runs before it was the default).
RIDGE_FIT = {"residual_fit": "ridge", "damp": 0.01, "act_order": False, "residual_ridge": 0.1}

SUITES = {
    "foundation": [(m, s, 0.0) for s in ("0.5", "2:4") for m in ("magnitude", "wanda", "sparsegpt")],
    "dual": [(m, "0.5", 0.5) for m in ("wanda", "sparsegpt", "duogpt")],
    "sweep": [(m, str(p), p) for p in (0.3, 0.4, 0.5, 0.55, 0.6, 0.65) for m in ("wanda", "sparsegpt", "duogpt")],
    # DuoGPT's components against dual-sparse SparseGPT at W50+X50 (docs/pruning.md, "Robustness").
    # Options are spelled out (not left to defaults), so cached results stay valid when defaults change.
    "duogpt-ablation": [("sparsegpt", "0.5", 0.5),
                        *[("duogpt", "0.5", 0.5, {"damp": 0.1, "act_order": True, "residual_scale": r})
                          for r in ("auto", 0.5, 0.0, 0.25)],
                        *[("duogpt", "0.5", 0.5, {"damp": 0.01, "act_order": False, "residual_scale": r})
                          for r in ("auto", 0.5)]],
    # The bars of DuoGPT's robustness (docs/pruning.md): its default against dual-sparse SparseGPT's at
    # W = X in 40/50/60%. DuoGPT's defaults are spelled out so that cached rows stay valid if they change.
    "robustness": [c for p in (0.4, 0.5, 0.6)
                   for c in (("sparsegpt", str(p), p),
                             ("duogpt", str(p), p, {"residual_fit": "ridge", "damp": 0.01, "act_order": False,
                                                    "residual_ridge": 0.1, "residual_scale": 0.25}))],
    # The candidates for DuoGPT's default residual scale, simplest first (0: no residual), at the
    # robustness levels: scripts/residual_default.py chooses among them on held-out calibration text.
    "residual-default": [("duogpt", str(p), p, {"damp": 0.1, "act_order": True, "residual_scale": r})
                         for p in (0.4, 0.5, 0.6) for r in (0.0, 0.25, 0.5)],
    # DuoGPT's residual fitted as dense weights first (--residual-fit ridge, SparseGPT's damp and column
    # order for the pruning solve): scales 0.25 and 0.5 at the levels the default is chosen on (40/50%),
    # 0.25 alone at 60% (a robustness bar, not a rung of scripts/residual_default.py's ladder).
    "residual-fit": [("duogpt", str(p), p, {**RIDGE_FIT, "residual_scale": r})
                     for p, scales in ((0.4, (0.25, 0.5)), (0.5, (0.25, 0.5)), (0.6, (0.25,))) for r in scales],
    # DuoGPT's residual from one part of dX only: the activations the linear drops
    # (--residual-upstream 0) or the earlier layers' error (--residual-dropped 0), docs/pruning.md.
    "residual-parts": [("duogpt", str(p), p, {**part, "residual_scale": r})
                       for p in (0.5, 0.4) for part, r in (({"residual_upstream": 0.0}, 0.25), ({"residual_upstream": 0.0}, 1.0),
                                                           ({"residual_dropped": 0.0}, 0.25), ({"residual_dropped": 0.0}, 0.5),
                                                           (RIDGE_FIT, 0.25))],  # the default, keyed as in residual-fit
    # The upstream-only residual's ladder, a further fit for scripts/residual_default.py ("ridge-upstream").
    "residual-upstream-fit": [("duogpt", str(p), p, {"residual_dropped": 0.0, "residual_scale": r})
                              for p in (0.4, 0.5) for r in (0.25, 0.5)],
    # The baselines at their own best settings (issue 29): SparseGPT with DuoGPT's damp/act_order,
    # Wanda scoring with the norms of the sparsified inputs it is served with.
    "baseline-settings": [("sparsegpt", "0.5", 0.5, {"damp": 0.1, "act_order": True}),
                          ("wanda", "0.5", 0.5),
                          ("wanda", "0.5", 0.5, {"norm_inputs": "sparsified"})],
    "duogpt-residual": [("duogpt", str(p), p, {"residual_scale": r, "residual_target": t})
                        for p in (0.5, 0.6) for t in ("running", "original") for r in (0.0, 0.25, 0.5, 1.0)
                        if not (r == 0.0 and t == "original")],  # scale 0: no residual, the target is moot
}


def options_of(config) -> dict:
    return config[3] if len(config) > 3 else {}


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def config_key(method: str, sparsity: str, p_x: float, options: dict) -> str:
    """The name a configuration's checkpoint and cached results carry under --work."""
    key = f"{method}-{sparsity.replace(':', 'of')}-x{p_x:g}"
    return key + "".join(f"-{k.replace('_', '')}{_fmt(v)}" for k, v in options.items())


def label(method: str, options: dict) -> str:
    """'duogpt (residual-scale 0.5, residual-target original)': the options as the CLI spells them."""
    if not options:
        return method
    return f"{method} ({', '.join(k.replace('_', '-') + ' ' + _fmt(v) for k, v in options.items())})"


def run(cmd: list[str], log: Path) -> float:
    try:
        return run_logged(cmd, log)
    except StepFailed as e:
        sys.exit(str(e))


def evaluate(args, target: str, mode: str | None, p_x: float | None, key: str) -> dict:
    if args.data != "wikitext2":  # results on other text are cached beside, not instead of, WikiText-2's
        key += "-" + re.sub(r"[^A-Za-z0-9.]+", "_", Path(args.data).name)

    def compute():
        out = args.work / f"eval-{key}.json"
        cmd = [sys.executable, "-m", "duoserve.cli", "eval", "ppl", target, "--data", args.data, "--seqlen",
               str(args.eval_seqlen), "--no-dense", "--dtype", args.eval_dtype, "--json", str(out)]
        if args.max_windows:
            cmd += ["--max-windows", str(args.max_windows)]
        if mode:
            cmd += ["--activation-mode", mode]
        if p_x is not None:
            cmd += ["--activation-sparsity", str(p_x)]
        seconds = run(cmd, args.work / f"eval-{key}.log")
        data = json.loads(out.read_text())
        result = data.get("pruned") or data.get("model")
        return {"ppl": result["ppl"], "windows": result["windows"], "seconds": round(seconds, 1),
                "realized_px": (result.get("activation_sparsity_realized") or {}).get("mean"), "data": data["data"]}

    return cached(args.work / f"result-eval-{key}.json", compute, args.cached_only)


def chosen_scales(log: Path) -> dict | None:
    """DuoGPT's per-linear residual scales chosen on held-out tokens (--residual-scale auto), from its log."""
    values = [float(m) for m in re.findall(r": residual scale ([0-9.]+) \(chosen", log.read_text())]
    if not values:
        return None
    values.sort()
    return {"n": len(values), "mean": sum(values) / len(values), "min": values[0], "median": values[len(values) // 2],
            "max": values[-1]}


def prune(args, method: str, sparsity: str, p_x: float, options: dict) -> tuple[Path, dict]:
    key = config_key(method, sparsity, p_x, options)
    ckpt = args.work / f"ckpt-{key}"

    def compute():
        summary = args.work / f"prune-{key}.json"
        cmd = [sys.executable, "-m", "duoserve.cli", "prune", "--method", method, "--sparsity", sparsity,
               "--activation-sparsity", str(p_x), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "-o", str(ckpt), "--json", str(summary)]
        if args.model:
            cmd.insert(4, args.model)
        for k, v in options.items():
            flag = k.replace('_', '-')
            cmd += [f"--{flag}" if v is True else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
        cmd += prune_flags(ckpt, summary)
        seconds = run(cmd, args.work / f"prune-{key}.log")
        return {**json.loads(summary.read_text()), "wall_seconds": round(seconds, 1),
                "residual_scales": chosen_scales(args.work / f"prune-{key}.log")}

    return ckpt, cached(args.work / f"result-prune-{key}.json", compute, args.cached_only or args.no_prune)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=sorted(SUITES))
    p.add_argument("--work", type=Path, required=True, help="folder for checkpoints, logs and cached results")
    p.add_argument("--model", default=None, help="model to prune (default: the built-in SmolLM2-135M-Instruct; "
                   "gemma-3-270m: the packaged Gemma-3-270M)")
    p.add_argument("--modes", default="topk,threshold",
                   help="activation modes to evaluate each dual-sparse checkpoint in (comma-separated)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length")
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--eval-dtype", default="bfloat16", help="compute dtype of evaluation (bf16: what vLLM serves)")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--first", default="",
                   help="comma-separated sparsity levels to prune first (e.g. 0.5,0.6): the most wanted rows land "
                        "early in a long run")
    p.add_argument("--only", default="",
                   help="comma-separated sparsity levels: run and render only these rows of the suite (e.g. 0.5)")
    p.add_argument("--no-prune", action="store_true",
                   help="prune nothing: evaluate the configurations already pruned under --work (e.g. on other "
                        "--data), list the others as not run")
    p.add_argument("--cached-only", action="store_true",
                   help="compute nothing: render the rows whose results are cached, list the others as not run")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    dual = args.suite != "foundation"
    dense_model = args.model or "default"
    rows = [{"method": "dense", "sparsity": "-", "p_x": 0.0, "ppl_off": evaluate(args, dense_model, "off", None, "dense")}]
    modes = args.modes.split(",")
    if dual and "topk" in modes:
        for p_x in sorted({c[2] for c in SUITES[args.suite]}):
            rows[0][f"ppl_topk_{p_x:g}"] = evaluate(args, dense_model, "topk", p_x, f"dense-topk{p_x:g}")
    configs = SUITES[args.suite]
    if args.only:
        only = {f"{float(v):g}" for v in args.only.split(",")}
        configs = [c for c in configs if (c[1] if ":" in c[1] else f"{float(c[1]):g}") in only]
    order = configs
    if args.first:  # compute these sparsity levels before the others; the table keeps its order
        first = [f"{float(v):g}" for v in args.first.split(",")]

        def rank(c):
            level = c[1] if ":" in c[1] else f"{float(c[1]):g}"
            return first.index(level) if level in first else len(first)

        order = sorted(configs, key=rank)
    not_run = []
    for config in order:
        method, sparsity, p_x = config[:3]
        options = options_of(config)
        try:
            ckpt, summary = prune(args, method, sparsity, p_x, options)
            row = {"method": method, "sparsity": sparsity, "p_x": p_x, "options": options, "prune": summary,
                   "config": config}
            key = ckpt.name[len("ckpt-"):]
            prune_log = args.work / f"prune-{key}.log"
            if "residual_scales" not in summary and prune_log.is_file():  # results cached before the field existed
                summary["residual_scales"] = chosen_scales(prune_log)
            if dual:
                for mode in modes:
                    row[f"ppl_{mode}"] = evaluate(args, str(ckpt), mode, None, f"{key}-{mode}")
            else:
                row["ppl_off"] = evaluate(args, str(ckpt), "off", None, key + "-off")
        except NotRun:
            not_run.append(f"{label(method, options)} {sparsity} (p_x {p_x:g})")
            continue
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("prune", "config")}, default=str), flush=True)
    position = {repr(c): i for i, c in enumerate(configs)}
    rows[1:] = sorted(rows[1:], key=lambda r: position[repr(r["config"])])

    settings = (f"model: {args.model or 'SmolLM2-135M-Instruct'}; "
                f"calibration: {args.nsamples} x {args.seqlen} tokens (C4, seed 0); evaluation: "
                f"{rows[0]['ppl_off']['data']}, seqlen {args.eval_seqlen}, {rows[0]['ppl_off']['windows']} windows, "
                f"{args.eval_dtype}; "
                f"machine: {platform.machine()} {os.cpu_count()} cores; command: "
                f"`python scripts/{Path(__file__).name} {' '.join(a for a in sys.argv[1:] if a not in ('--cached-only', '--no-prune'))}`")
    table = render(rows, dual, settings)
    if not_run:
        table += "\n\nNot run yet (no cached result): " + ", ".join(not_run) + "."
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot and args.suite == "sweep":
        plot(rows, args.plot)
    return 0


def render(rows: list[dict], dual: bool, settings: str) -> str:
    if dual:
        head = "| method | p_w | p_x | PPL (top-k) | PPL (threshold) | realized p_x (threshold) | prune s | peak RSS MiB |"
    else:
        head = "| method | sparsity | PPL | prune s | peak RSS MiB |"
    lines = [settings, "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["method"] == "dense":
            if dual:
                extra = ", ".join(f"{k[9:]}: {v['ppl']:.2f}" for k, v in r.items() if k.startswith("ppl_topk_"))
                extra = f" (dense weights, top-k p_x {extra})" if extra else ""
                lines.append(f"| dense | 0 | 0 | {r['ppl_off']['ppl']:.2f}{extra} | - | - | - | - |")
            else:
                lines.append(f"| dense | 0 | {r['ppl_off']['ppl']:.2f} | - | - |")
            continue
        pr = r["prune"]
        if dual:
            def ppl(mode):
                return f"{r[mode]['ppl']:.2f}" if mode in r else "-"

            realized = f"{r['ppl_threshold']['realized_px']:.3f}" if "ppl_threshold" in r else "-"
            name = label(r['method'], r['options'])
            if pr.get("residual_scales"):
                sc = pr["residual_scales"]
                name += f" [chosen scales of {sc['n']} linears: median {sc['median']:.2f}, {sc['min']:.2f}-{sc['max']:.2f}]"
            lines.append(f"| {name} | {r['sparsity']} | {r['p_x']:g} | {ppl('ppl_topk')} | "
                         f"{ppl('ppl_threshold')} | {realized} | "
                         f"{pr['prune_seconds']:.0f} | {pr['peak_rss_mib']:.0f} |")
        else:
            lines.append(f"| {label(r['method'], r['options'])} | {r['sparsity']} | {r['ppl_off']['ppl']:.2f} | {pr['prune_seconds']:.0f} | "
                         f"{pr['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ("wanda", "sparsegpt", "duogpt"):
        for mode, style in (("topk", "-o"), ("threshold", "--s")):
            pts = sorted((float(r["sparsity"]), r[f"ppl_{mode}"]["ppl"]) for r in rows if r["method"] == method)
            ax.plot([p * 100 for p, _ in pts], [v for _, v in pts], style, label=f"{method} ({mode})")
    ax.axhline(rows[0]["ppl_off"]["ppl"], color="gray", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("dual sparsity p_w = p_x (%)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
