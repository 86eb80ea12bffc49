"""Build a benchmark report folder from the CSVs a sweep wrote.

Layout read (written by duoserve.loadtest.cli):
    run.json                         settings, servers, command, machine
    raw/<label>/u<N>_requests.csv    one exact row per request (+ locust's own CSVs and log)
    quality/<label>.json             perplexity and greedy outputs (optional)
Written:
    summary.csv, quality.csv, README.md, latency_vs_concurrency.png,
    throughput_vs_concurrency.png, sparse_vs_dense.png (when there are two servers)
`duoserve bench --rebuild-report DIR` reruns only this step.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import re
from pathlib import Path

from duoserve.errors import InputError
from duoserve.loadtest import metrics as M
from duoserve.loadtest.quality import agreement

log = logging.getLogger(__name__)

_LEVEL_FILE = re.compile(r"u(\d+)_requests\.csv$")
STATS = ("mean", "median", "p90", "p99")


def load_results(run_dir: Path) -> tuple[dict, dict[str, dict[int, dict]]]:
    """(run.json, {label: {users: summary}}) from a run folder."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise InputError(f"{run_dir} has no run.json; is it a folder written by duoserve bench?")
    meta = json.loads(meta_path.read_text())
    results: dict[str, dict[int, dict]] = {}
    for server in meta["servers"]:
        label = server["label"]
        for f in sorted((run_dir / "raw" / label).glob("u*_requests.csv")):
            m = _LEVEL_FILE.search(f.name)
            if m:
                results.setdefault(label, {})[int(m.group(1))] = M.summarize(M.read_records(f))
    if not results:
        raise InputError(f"{run_dir}/raw holds no u<N>_requests.csv files")
    return meta, results


def _ms(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * 1000:.1f}"


def _num(x: float, fmt: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def write_summary_csv(results: dict, path: Path) -> None:
    cols = ["server", "users", "requests", "ok", "failures", "errors", "wall_s", "request_throughput",
            "token_throughput", "mean_prompt_tokens", "mean_output_tokens"]
    cols += [f"{m}_{s}" for m in M.METRICS for s in (*STATS, "count")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for label, levels in results.items():
            for users, s in sorted(levels.items()):
                row = {k: s[k] for k in cols[2:11] if k in s}
                row.update(server=label, users=users, errors="; ".join(f"{k}: {v}" for k, v in s["errors"].items()))
                for m in M.METRICS:
                    for st in (*STATS, "count"):
                        row[f"{m}_{st}"] = s[m][st]
                w.writerow(row)


def quality_summary(run_dir: Path, labels: list[str]) -> dict | None:
    """{label: {ppl..., agreement vs the first label}} or None when no quality was measured."""
    files = {lb: Path(run_dir) / "quality" / f"{lb}.json" for lb in labels}
    data = {lb: json.loads(p.read_text()) for lb, p in files.items() if p.is_file()}
    if not data:
        return None
    ref = labels[0]
    out = {}
    for lb, d in data.items():
        row = dict(d.get("perplexity") or {})
        row["source"] = d.get("source", "")
        if ref in data and data[ref].get("greedy") and d.get("greedy"):
            row.update(agreement(data[ref]["greedy"], d["greedy"]))
        out[lb] = row
    return out


def _plot_levels(ax, results, metric, stat, style, labelfmt):
    for i, (label, levels) in enumerate(results.items()):
        users = sorted(levels)
        ys = [levels[u][metric][stat] * (1000 if metric != "tokens_per_s" else 1) for u in users]
        ax.plot(users, ys, style, color=f"C{i}", marker="o", label=labelfmt.format(label=label, stat=stat))


def _axes_setup(ax, title, ylabel, users):
    from matplotlib.ticker import NullLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(users)  # label the measured levels as plain numbers (1, 2, 4, ...), not 2^k
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("concurrent users")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def make_plots(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers or in CI
    import matplotlib.pyplot as plt

    written = []
    all_users = sorted({u for levels in results.values() for u in levels})
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, metric in zip(axes.flat, ("ttft_s", "tpot_s", "itl_s", "e2e_s")):
        _plot_levels(ax, results, metric, "median", "-", "{label} median")
        _plot_levels(ax, results, metric, "p90", "--", "{label} p90")
        _axes_setup(ax, M.METRIC_LABELS[metric], "ms", all_users)
    fig.suptitle("Latency vs concurrency")
    fig.tight_layout()
    fig.savefig(out_dir / "latency_vs_concurrency.png", dpi=80)
    plt.close(fig)
    written.append("latency_vs_concurrency.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "request_throughput", "requests/s"),
                           (axes[1], "token_throughput", "output tokens/s")):
        for i, (label, levels) in enumerate(results.items()):
            users = sorted(levels)
            ax.plot(users, [levels[u][key] for u in users], "-", color=f"C{i}", marker="o", label=label)
        _axes_setup(ax, f"Throughput: {title}", title, all_users)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput_vs_concurrency.png", dpi=80)
    plt.close(fig)
    written.append("throughput_vs_concurrency.png")

    labels = list(results)
    if len(labels) >= 2:
        ref, other = labels[0], labels[1]
        users = sorted(set(results[ref]) & set(results[other]))
        fig, ax = plt.subplots(figsize=(7, 4))
        series = [("token_throughput", None, "token throughput"), ("tpot_s", "median", "median TPOT"),
                  ("ttft_s", "median", "median TTFT"), ("e2e_s", "median", "median E2E")]
        for i, (key, stat, name) in enumerate(series):
            ys = []
            for u in users:
                a, b = results[ref][u][key], results[other][u][key]
                a, b = (a, b) if stat is None else (a[stat], b[stat])
                ys.append(b / a if a and not math.isnan(a) and not math.isnan(b) else math.nan)
            ax.plot(users, ys, "-", marker="o", color=f"C{i}", label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        _axes_setup(ax, f"{other} / {ref} (throughput > 1 and latency < 1 favour {other})", "ratio", users)
        fig.tight_layout()
        fig.savefig(out_dir / "sparse_vs_dense.png", dpi=80)
        plt.close(fig)
        written.append("sparse_vs_dense.png")
    return written


def _markdown(meta: dict, results: dict, quality: dict | None, plots: list[str]) -> str:
    spec, lines = meta["load"], []
    lines += [f"# {meta.get('title') or 'duoserve bench report'}", "",
              f"Produced {meta.get('date', '')} by:", "", "```", meta.get("command", ""), "```", ""]
    lines += ["## Setup", "", f"- Machine: {meta.get('machine', '')}",
              f"- Software: {meta.get('software', '')}",
              f"- Load: {spec['api']} API, {'streamed' if spec['stream'] else 'not streamed'}, prompts of "
              f"{spec['prompt_words']} words of real text ({spec['prompt_source']}, seed {spec['seed']}), "
              f"{spec['max_tokens']} output tokens "
              f"({'model may stop at EOS' if spec['natural_length'] else 'fixed: ignore_eos + min_tokens'}), "
              f"temperature 0; closed loop (each user sends its next request when the last one ends).",
              f"- Each level: {spec['duration_s']:g} s"
              + (f" or {spec['max_requests']} requests, whichever first" if spec["max_requests"] else "")
              + f"; request timeout {spec['request_timeout_s']:g} s; levels run one after the other, "
              "one server at a time."]
    gen = meta.get("load_generation") or {}
    if gen.get("processes", 1) > 1 or gen.get("remote_workers"):
        lines.append(f"- Load generators: locust's distributed mode, {gen['processes']} worker process(es) on this "
                     f"machine (at most one per user)" + (f" + {gen['remote_workers']} on other machines"
                                                          if gen.get("remote_workers") else "") + ".")
    lines.append("")
    lines += ["| server | model | source | weights on disk | server RSS after the sweep |", "|---|---|---|---|---|"]
    for s in meta["servers"]:
        wb = f"{s['weights_bytes'] / 2**20:.0f} MiB" if s.get("weights_bytes") else "-"
        rss = f"{s['rss_bytes'] / 2**20:.0f} MiB" if s.get("rss_bytes") else "-"
        lines.append(f"| {s['label']} | {s['model']} | {s['source']} | {wb} | {rss} |")
    lines += ["", "## Throughput and failures", "",
              "| server | users | requests | ok | failed | errors | req/s | output tok/s | prompt tok | output tok "
              "| machine load before/after |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    loads = meta.get("machine_load") or {}
    for label, levels in results.items():
        for u, s in sorted(levels.items()):
            errs = ", ".join(f"{k} x{v}" for k, v in s["errors"].items()) or "-"
            load = loads.get(label, {}).get(str(u))
            load = f"{load[0]:.1f} / {load[1]:.1f}" if load else "-"
            lines.append(f"| {label} | {u} | {s['requests']} | {s['ok']} | {s['failures']} | {errs} | "
                         f"{_num(s['request_throughput'])} | {_num(s['token_throughput'], '.1f')} | "
                         f"{_num(s['mean_prompt_tokens'], '.0f')} | {_num(s['mean_output_tokens'], '.0f')} | {load} |")
    lines += ["", "Machine load: the 1-minute load average of the machine (all its processes, not only this "
              "benchmark) before and after the level; above the CPU count, other work competed for the CPUs."]
    for m in M.METRICS:
        lines += ["", f"## {M.METRIC_LABELS[m]}", "", "| server | users | n | mean | median | p90 | p99 |",
                  "|---|---|---|---|---|---|---|"]
        fmt = (lambda x: _num(x, ".1f")) if m == "tokens_per_s" else _ms
        for label, levels in results.items():
            for u, s in sorted(levels.items()):
                d = s[m]
                lines.append(f"| {label} | {u} | {d['count']} | " + " | ".join(fmt(d[k]) for k in STATS) + " |")
    if quality:
        lines += ["", "## Quality through the endpoint", ""]
        first = next(iter(quality.values()))
        lines += [f"Perplexity of {first.get('windows', '?')} held-out windows ({first.get('source', '')}) from "
                  "prompt logprobs (echo, max_tokens=0); greedy agreement against the first server.", "",
                  "| server | perplexity | scored tokens | exact-match outputs | token agreement "
                  "| mean common prefix |",
                  "|---|---|---|---|---|---|"]
        for lb, q in quality.items():
            lines.append(f"| {lb} | {_num(q.get('ppl', math.nan))} | {q.get('tokens', '-')} | "
                         f"{_num(q.get('exact_match', math.nan))} | {_num(q.get('token_agreement', math.nan))} | "
                         f"{_num(q.get('mean_common_prefix', math.nan), '.1f')} / "
                         f"{_num(q.get('mean_reference_tokens', math.nan), '.1f')} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Definitions", "", M.DEFINITIONS.strip(), ""]
    if meta.get("notes"):
        lines += ["## Notes", "", meta["notes"], ""]
    return "\n".join(lines)


def build_report(run_dir: Path) -> Path:
    """Write summary.csv, quality.csv, the plots and README.md into run_dir; returns README.md."""
    run_dir = Path(run_dir)
    meta, results = load_results(run_dir)
    write_summary_csv(results, run_dir / "summary.csv")
    quality = quality_summary(run_dir, [s["label"] for s in meta["servers"]])
    if quality:
        keys = sorted({k for q in quality.values() for k in q})
        with open(run_dir / "quality.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["server", *keys])
            w.writeheader()
            for lb, q in quality.items():
                w.writerow({"server": lb, **q})
    plots = make_plots(results, run_dir)
    readme = run_dir / "README.md"
    readme.write_text(_markdown(meta, results, quality, plots), encoding="utf-8")
    log.info("report written to %s", readme)
    return readme
