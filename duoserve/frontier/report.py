"""The frontier's outputs: a markdown table, a Pareto plot (quality vs speed) and a JSON summary."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from duoserve.workcache import write_json_atomic


def _f(x, fmt: str, scale: float = 1.0) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x * scale, fmt)


def _ratio(x, ref) -> str:
    return "" if x is None or not ref else f" ({x / ref:.2f}x)"


def setting_lines(args, rows: list[dict], command: str, seconds: float | None) -> list[str]:
    dense = rows[0]
    from duoserve.frontier.speed import host

    h = next((r["host"] for r in rows if r.get("host")), None) or host()
    windows = dense.get("ppl_windows")
    lines = [f"- command: `{command}`",
             f"- model: {args.model or 'SmolLM2-135M-Instruct (built-in)'}; calibration {args.nsamples} x "
             f"{args.seqlen} tokens (C4, seed 0)",
             f"- quality: perplexity on {dense.get('ppl_data', args.data)}, {windows if windows else '?'} windows of "
             f"{args.eval_seqlen} tokens, {args.eval_dtype}, in-process (`duoserve eval ppl`)"
             + (f"; zero-shot mean accuracy over {args.zeroshot_tasks}, first {args.zeroshot_limit} items each "
                f"(`duoserve eval zeroshot`)" if args.zeroshot_tasks else "")]
    if args.no_speed:
        lines.append("- speed: not measured (--no-speed); answers in-process")
    else:
        lines.append(f"- speed: each point served by `duoserve serve` (vLLM), one at a time; batch-1 TPOT is the "
                     f"median over {args.duration:g} s at 1 user, throughput is output tokens/s at "
                     f"{args.throughput_users} users over {args.duration:g} s; prompts {args.prompt_words} words of "
                     f"C4, exactly {args.max_tokens} output tokens; dense measured in the same run"
                     + ("; served: the dense model and the points that pass the rule in-process (--speed-for "
                        "candidates: PPL bound and in-process answers), the others keep their in-process answers"
                        if getattr(args, "speed_for", "all") == "candidates" else ""))
    loads = [x for r in rows for x in r.get("load") or []]
    times = sorted(r["measured_at"] for r in rows if r.get("measured_at"))
    lines.append(f"- host: {h['cpu']}, {h['cores']} cores, avx512_bf16 {'yes' if h['avx512_bf16'] else 'no'}, "
                 f"amx_bf16 {'yes' if h['amx_bf16'] else 'no'}"
                 + (f"; 1-minute load average around the load levels {min(loads):.1f}-{max(loads):.1f}" if loads else "")
                 + (f"; served {times[0]} to {times[-1]}" if times else ""))
    lines.append(f"- rule: the fastest point with PPL <= {args.max_ppl_ratio:g} x dense and no empty or looping "
                 f"greedy answer to the {len(rows[0].get('answers') or []) or 4} fixed prompts "
                 f"(duoserve.frontier.rule)" + ("" if seconds is None else
                                                 f"; this invocation took {seconds / 60:.0f} min (cached steps not rerun)"))
    return lines


def render_table(rows: list[dict], choice: dict | None) -> str:
    dense = rows[0]
    has_zs = any(r.get("zeroshot_acc") is not None for r in rows)
    has_speed = any(r.get("tpot_s") is not None for r in rows)
    users = next((r["throughput_users"] for r in rows if r.get("throughput_users")), None)
    head = ["point", "method", "p_w", "p_x pruned for", "p_x served", "PPL"]
    head += ["zero-shot acc"] if has_zs else []
    head += ["TPOT b1 ms", f"tok/s {users} users"] if has_speed else []
    head += ["Pareto", "answers", "rule"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        name = ("**" + r["point"] + "** (chosen)") if r.get("chosen") else r["point"]
        cells = [name, r["method"], f"{r['weight_sparsity']:g}",
                 "-" if r["pruned_px"] is None else f"{r['pruned_px']:g}", f"{r['p_x']:g}",
                 _f(r.get("ppl"), ".2f") + ("" if r["dense"] else _ratio(r.get("ppl"), dense.get("ppl")))]
        if has_zs:
            cells.append(_f(r.get("zeroshot_acc"), ".1f", 100))
        if has_speed:
            # TPOT ratio as a speedup (dense TPOT / this TPOT), throughput ratio as is.
            tp = r.get("tpot_s")
            speedup = "" if r["dense"] or not tp or not dense.get("tpot_s") else f" ({dense['tpot_s'] / tp:.2f}x)"
            cells.append(_f(tp, ".1f", 1000) + speedup)
            cells.append(_f(r.get("throughput"), ".1f")
                         + ("" if r["dense"] else _ratio(r.get("throughput"), dense.get("throughput"))))
        cells.append("yes" if r.get("pareto") else "")
        problems = [x for x in r.get("rule_reasons", []) if x.startswith("answer")]
        cells.append("-" if r.get("answers") is None else ("ok" if not problems else "; ".join(problems)))
        cells.append("dense" if r["dense"] else ("-" if "still_answers" not in r else
                                                 "passes" if r["still_answers"] else "fails"))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("PPL (x dense); TPOT (dense TPOT / TPOT: > 1 is faster); tok/s (x dense). Pareto: no other point "
                 "is as good on both PPL and batch-1 TPOT and better on one" + ("" if has_speed else
                 " (no speed measured: (1 - p_w)(1 - p_x) in place of TPOT)") + ".")
    answered = [r for r in rows if r.get("answers")]
    if answered:
        sources = {r.get("answers_from", "") for r in answered}
        mixed = len(sources) > 1  # --speed-for candidates: served points answer from the endpoint
        lines += ["", f"Greedy answers to the first fixed prompt ({'source per line' if mixed else sources.pop()}), "
                      "first 160 characters:", ""]
        for r in answered:
            text = " ".join(r["answers"][0].split())
            text = text if len(text) <= 160 else text[:157] + "..."
            where = f" [{r.get('answers_from', '').split(' ')[0]}]" if mixed else ""
            lines.append(f"- {r['point']}{where}: \"{text}\"" if text else f"- {r['point']}{where}: (empty)")
        lines.append("")
    if choice is not None:
        lines.append(f"Operating point: {choice['point'] or 'none'}: {choice['reason']}."
                     + (f" Serve it: `{choice['serve_command']}`." if choice.get("serve_command") else ""))
    return "\n".join(lines)


def plot(rows: list[dict], choice: dict | None, path: Path, max_ratio: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    has_speed = any(r.get("tpot_s") for r in rows)

    def x_of(r):
        if has_speed:
            return 1.0 / r["tpot_s"] if r.get("tpot_s") else None
        return 1.0 / max((1 - r["weight_sparsity"]) * (1 - r["p_x"]), 1e-9)

    dense = rows[0]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = sorted({r["method"] for r in rows[1:]})
    markers = dict(zip(methods, "osD^v<>"))
    for m in methods:
        pts = [(x_of(r), r["ppl"], r) for r in rows[1:] if r["method"] == m and r.get("ppl") and x_of(r)]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[m], label=m, zorder=3)
        for x, y, r in pts:
            ax.annotate(f"W{r['weight_sparsity']:g} X{r['p_x']:g}" + (f"/{r['pruned_px']:g}"
                        if r["pruned_px"] != r["p_x"] else ""), (x, y), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    if dense.get("ppl") and x_of(dense):
        ax.scatter([x_of(dense)], [dense["ppl"]], marker="*", s=160, color="black", label="dense", zorder=4)
    if dense.get("ppl"):
        ax.axhline(max_ratio * dense["ppl"], color="gray", ls="--", lw=0.8,
                   label=f"rule: PPL <= {max_ratio:g} x dense")
    front = sorted((x_of(r), r["ppl"]) for r in rows if r.get("pareto") and x_of(r))
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], color="C7", lw=1, zorder=2, label="Pareto front")
    chosen = next((r for r in rows if r.get("chosen")), None)
    if chosen is not None and x_of(chosen):
        ax.scatter([x_of(chosen)], [chosen["ppl"]], s=320, facecolors="none", edgecolors="red", lw=2,
                   label="operating point", zorder=5)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("batch-1 decode tokens/s (1 / TPOT), served" if has_speed else
                  "1 / ((1 - p_w)(1 - p_x))  (no speed measured)")
    ax.set_ylabel("perplexity" + (f" ({dense.get('ppl_data', '')[:40]})" if dense.get("ppl_data") else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title("quality vs speed (labels: W p_w X p_x served[/pruned for])", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(args, grid, rows: list[dict], choice: dict | None, not_run: list[str], command: str,
                  seconds: float | None) -> list[Path]:
    md = args.markdown or args.work / "frontier.md"
    png = args.plot or args.work / "frontier.png"
    js = args.json or args.work / "frontier.json"
    text = "\n".join(setting_lines(args, rows, command, seconds)) + "\n\n" + render_table(rows, choice)
    if not_run:
        text += "\n\nNot run or failed (no cached result): " + ", ".join(not_run) + "."
    print(text)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text + "\n")
    written = [md]
    if any(r.get("ppl") for r in rows):
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, choice, png, args.max_ppl_ratio)
        written.append(png)
    summary = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": args.model,
               "grid": {"methods": grid.methods, "sparsities": grid.sparsities, "prune_px": grid.prune_px or "same",
                        "also_prune": grid.also_prune, "serve_px": grid.serve_px},
               "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen},
               "quality": {"data": args.data, "seqlen": args.eval_seqlen, "max_windows": args.max_windows,
                           "dtype": args.eval_dtype, "zeroshot_tasks": args.zeroshot_tasks,
                           "zeroshot_limit": args.zeroshot_limit},
               "speed": None if args.no_speed else {"throughput_users": args.throughput_users,
                                                    "duration_s": args.duration, "max_tokens": args.max_tokens,
                                                    "prompt_words": args.prompt_words,
                                                    "speed_for": getattr(args, "speed_for", "all")},
               "rule": {"max_ppl_ratio": args.max_ppl_ratio}, "choice": choice, "rows": rows, "not_run": not_run,
               "wall_seconds": None if seconds is None else round(seconds, 1)}
    write_json_atomic(js, summary)
    written.append(js)
    return written
