#!/usr/bin/env python
"""Batch-1 decode speed through vLLM: a dense model vs its dual-sparse checkpoint, in one run.

    python scripts/bench_serve.py                       # SmolLM2-135M (built-in) vs W50%+X50%
    python scripts/bench_serve.py --sparse CKPT         # use an existing checkpoint
    python scripts/bench_serve.py --json out.json --eager

For each server (dense first, then sparse; never both at once on a small machine): start it with
duoserve's launcher and the same options, warm it up, then send `--repeats` streamed completions one
at a time (batch 1), each exactly `--max-tokens` long (ignore_eos). Per request: TTFT (request ->
first token) and TPOT (time between the first and the last token / (tokens - 1)); decode tokens/s
is 1 / TPOT. The median over repeats is reported, with the machine's load average before each
measurement (the numbers mean little on a busy machine). Weight memory: the model's linear
weights as vLLM holds them (dense bf16; for duoserve, the packed kernel layout as the plugin
reports it in the server log), plus the dense embeddings / lm_head common to both.

The sparse checkpoint, unless given, is made with `duoserve prune` (SparseGPT, --sparsity 0.5
--activation-sparsity 0.5 by default) into the cache and reused on later runs.

TTFT is the prefill of the prompt: the built-in prompt is one sentence (~35 tokens); with
`--prompt-words N` every request gets its own window of N words of C4 text (the same seeded
sequence for both servers, as `duoserve bench` draws them), so vLLM's prefix cache never holds a
block of it and TTFT times the whole prompt. `--profile DIR` then also runs `--repeats` requests
of one output token under vLLM's torch profiler (after the timed runs, which it would slow down)
and prints, per request, where the forward pass spends its time: the linears (vLLM's oneDNN GEMM,
or the duoserve ops with their number of calls), attention, the rest. The traces stay in DIR.

    python scripts/bench_serve.py --sparse CKPT --prompt-words 100 --profile /tmp/prof
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

log = logging.getLogger("bench_serve")
PROMPT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz "
          "combined movable metal type, oil-based ink and a wooden screw press. Within fifty years")


def _prune(model: Path, out: Path, args) -> Path:
    if (out / "config.json").is_file():
        log.info("reusing %s", out)
        return out
    cmd = [sys.executable, "-m", "duoserve.cli", "prune", str(model), "--method", args.method,
           "--sparsity", str(args.sparsity), "--activation-sparsity", str(args.activation_sparsity),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "-o", str(out)]
    log.info("pruning: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return out


def _prompts(args):
    """The prompt of every request: the built-in sentence, or seeded C4 windows of --prompt-words."""
    if not args.prompt_words:
        return lambda: PROMPT
    from duoserve.loadtest.prompts import PromptSampler

    return PromptSampler.from_source("c4", args.prompt_words, seed=0).sample


def _stream_once(srv, max_tokens: int, prompt: str = PROMPT, timeout: float = 600.0) -> tuple[float, float, int]:
    """One streamed completion -> (TTFT s, TPOT s, output tokens)."""
    body = {"model": srv.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, tokens = [], None
    with requests.post(srv.url + "/completions", json=body, stream=True, timeout=timeout,
                       headers={"Authorization": f"Bearer {srv.api_key}"}) as r:
        r.raise_for_status()
        for raw in r.iter_lines():
            if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
                continue
            event = json.loads(raw[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    if tokens is None or tokens < 2 or len(stamps) < 2:
        raise RuntimeError(f"unexpected stream: {tokens} tokens, {len(stamps)} text events")
    return stamps[0] - t0, (stamps[-1] - stamps[0]) / (tokens - 1), tokens


# Rows of vLLM's profiler table (profiler_out.txt, sorted by self CPU time) -> what they are.
PROFILE_KINDS = (("duoserve::", "duoserve linears"), ("_C::onednn_mm", "dense GEMM (linears, lm_head)"),
                 ("attention", "attention"), ("attn", "attention"), ("kv_cache", "attention"))


def _profile(srv, label: str, prompts, args) -> dict:
    """`--repeats` one-token requests under vLLM's torch profiler -> ms per request by kind of op."""
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    requests.post(srv.base_url + "/start_profile", headers=headers, timeout=60).raise_for_status()
    for _ in range(args.repeats):
        body = {"model": srv.model, "prompt": prompts(), "max_tokens": 1, "temperature": 0.0}
        requests.post(srv.url + "/completions", json=body, headers=headers, timeout=600).raise_for_status()
    requests.post(srv.base_url + "/stop_profile", headers=headers, timeout=600).raise_for_status()
    tables = sorted((Path(args.profile) / label).glob("rank0*profiler_out*.txt"))
    if not tables:
        raise RuntimeError(f"vLLM wrote no profiler table under {Path(args.profile) / label}")
    return profile_table(tables[-1].read_text(), args.repeats)


def profile_table(text: str, requests_profiled: int) -> dict:
    """vLLM's profiler table -> ms per request of the prefill forward and of each kind of op (self
    time), and the linear op calls per request."""
    ms: dict[str, float] = {}
    calls: dict[str, int] = {}

    def to_ms(text: str) -> float:  # "1.234ms", "56.7us", "2.1s"
        number, unit = re.fullmatch(r"([\d.]+)(ms|us|s)", text).groups()
        return float(number) * {"ms": 1.0, "us": 1e-3, "s": 1e3}[unit]

    for line in text.splitlines():
        # Name, Self CPU %, Self CPU, CPU total %, CPU total, CPU time avg, # of Calls
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) < 7 or not re.fullmatch(r"[\d.]+(ms|us|s)", cols[2]) or not cols[6].isdigit():
            continue
        name = cols[0]
        if re.fullmatch(r"execute_context_[1-9]\d*\(\d+\)_generation_0\(0\)", name):  # the prefill steps
            ms["forward (total)"] = ms.get("forward (total)", 0.0) + to_ms(cols[4])
            continue
        kind = next((k for key, k in PROFILE_KINDS if key in name), None)
        if kind is not None:
            ms[kind] = ms.get(kind, 0.0) + to_ms(cols[2])
            calls[kind] = calls.get(kind, 0) + int(cols[6])
    per_request = {k: round(v / requests_profiled, 1) for k, v in ms.items()}
    per_request.update({f"{k}: calls": c // requests_profiled for k, c in calls.items() if k != "attention"})
    return per_request


def _linear_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the dense model's target linear weights in bf16, bytes of everything else)."""
    from safetensors import safe_open

    from duoserve.format.schema import DEFAULT_TARGETS, is_target

    lin = other = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                nbytes = n * {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}.get(sl.get_dtype(), 4)
                if name.endswith(".weight") and is_target(name[:-7], DEFAULT_TARGETS):
                    lin += nbytes
                else:
                    other += nbytes
    return lin, other


def linear_breakdown(sparse: Path, repeats: int = 15) -> dict:
    """Batch-1 time of all target linears of one token, outside vLLM, cache-cold (every layer's own
    weights, as in a real forward): vLLM's dense CPU GEMM vs the duoserve op, grouped as the plugin
    groups them. x ~ N(0, s) with s chosen so that half of each input is under its threshold."""
    import torch

    from duoserve.format.io import load_checkpoint
    from duoserve.kernels import dual_sparse_linear_op, pack_dense
    from duoserve.loaders.config import hf_shard_names
    from duoserve.loaders.linear import group_by_threshold, make_shards
    from duoserve.loaders.vllm_compat import dense_cpu_linear

    torch.set_num_threads(1)  # what vLLM gives the model on a 2-core machine
    ckpt = load_checkpoint(sparse)
    fused = {"q_proj": "qkv_proj", "gate_proj": "gate_up_proj"}
    mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    dense_calls, sparse_calls = [], []
    for name in ckpt.qconfig.modules:
        parent, last = name.rsplit(".", 1)
        if last in ("k_proj", "v_proj", "up_proj"):
            continue  # handled with their fused layer
        names = hf_shard_names(f"{parent}.{fused.get(last, last)}", mapping)
        infos = [ckpt.qconfig.modules[n] for n in names]
        weight = torch.cat([ckpt.state_dict[n + ".weight"] for n in names])  # [sum N, K] bf16
        for g in group_by_threshold(make_shards(names, infos), [ckpt.thresholds[n] for n in names]):
            w = weight[g.row_offset:g.row_offset + g.rows].contiguous()
            p, t = pack_dense(w), torch.tensor(g.threshold, dtype=torch.float32)
            x = (torch.randn(1, g.cols) * (max(g.threshold, 1e-6) / 0.6745)).to(w.dtype)
            sparse_calls.append(lambda x=x, p=p, t=t, g=g: dual_sparse_linear_op(
                x, p.bitmap, p.offsets, p.values, t, None, g.rows, g.cols))
        dense = dense_cpu_linear(weight)
        xd = torch.randn(1, weight.shape[1], dtype=weight.dtype)
        dense_calls.append(lambda xd=xd, dense=dense: dense(xd))

    def run(calls) -> float:
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e3

    d = min(run(dense_calls) for _ in range(repeats))
    s = min(run(sparse_calls) for _ in range(repeats))
    return {"linears_dense_ms": round(d, 2), "linears_duoserve_ms": round(s, 2), "linears_speedup": round(d / s, 2),
            "op_calls_per_token": len(sparse_calls), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def measure(label: str, folder: Path, args) -> dict:
    from duoserve.loaders.server import launch

    extra = ["--max-num-seqs", "1"]
    if args.profile:
        extra += ["--profiler-config", json.dumps({
            "profiler": "torch", "torch_profiler_dir": str(Path(args.profile).resolve() / label),
            "torch_profiler_with_stack": False, "torch_profiler_use_gzip": False})]
    prompts = _prompts(args)
    with launch(folder, served_model_name=label, enforce_eager=args.eager, max_model_len=args.max_model_len,
                kv_cache_gib=args.kv_cache_gib, extra_vllm_args=extra,
                log_path=Path(args.workdir) / f"vllm-{label}.log") as srv:
        t = time.perf_counter()
        srv.wait_ready(timeout=1200)
        ready_s = time.perf_counter() - t
        for _ in range(args.warmup):
            _stream_once(srv, 16, prompts())
        load_before = os.getloadavg()
        runs = [_stream_once(srv, args.max_tokens, prompts()) for _ in range(args.repeats)]
        profile = _profile(srv, label, prompts, args) if args.profile else None
        server_log = srv.log_path.read_text(errors="replace")
    tpot = statistics.median(r[1] for r in runs)
    result = {"label": label, "folder": str(folder), "ready_s": round(ready_s, 1),
              "loadavg_before": [round(x, 2) for x in load_before],
              "ttft_ms": round(1000 * statistics.median(r[0] for r in runs), 1),
              "tpot_ms": round(1000 * tpot, 2), "decode_tok_s": round(1.0 / tpot, 1),
              "ttft_ms_all": [round(1000 * r[0], 1) for r in runs],
              "tpot_ms_all": [round(1000 * r[1], 2) for r in runs], "tokens": runs[0][2]}
    if profile is not None:
        result["profile_ms_per_request"] = profile
    found = re.findall(r"(\d+) linear layers repacked .*?\(([\d.]+) MiB, ([\d.]+) bytes/weight\)", server_log)
    if found:  # the last start in the log is this one
        m = [None, *found[-1]]
        result["linear_weights_mib"] = float(m[2])
        result["bytes_per_weight"] = float(m[3])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--model", default=None, help="dense HF folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--sparse", default=None, help="an existing duoserve checkpoint (default: prune one)")
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--sparsity", default="0.5")
    p.add_argument("--activation-sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows for the prune (default 16)")
    p.add_argument("--seqlen", type=int, default=256, help="calibration window length (default 256)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-gib", type=float, default=1)
    p.add_argument("--eager", action="store_true", help="--enforce-eager for both servers (default: vLLM's compile)")
    p.add_argument("--workdir", default=None, help="checkpoints and server logs (default: ~/.cache/duoserve/bench)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--prompt-words", type=int, default=0,
                   help="a different C4 window of this many words per request (default: the built-in sentence)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile --repeats one-token requests per server (vLLM's torch profiler; traces in DIR)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the linears alone (vLLM's dense CPU GEMM vs the duoserve op), outside vLLM")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from duoserve.prune.model_sources import cache_root, default_model_dir

    args.workdir = Path(args.workdir or cache_root() / "bench")
    args.workdir.mkdir(parents=True, exist_ok=True)
    dense = Path(args.model) if args.model else default_model_dir()
    tag = f"{args.method}-w{args.sparsity}-x{args.activation_sparsity}-n{args.nsamples}x{args.seqlen}"
    sparse = Path(args.sparse) if args.sparse else _prune(dense, args.workdir / f"{dense.name}-{tag}", args)
    cores = os.cpu_count() or 1
    if os.getloadavg()[0] > 0.5 * cores:
        log.warning("load average %.1f on %d cores: the timings will be noisy", os.getloadavg()[0], cores)

    results = [measure("dense", dense, args), measure("dual-sparse", sparse, args)]
    lin, other = _linear_bytes(dense)
    results[0]["linear_weights_mib"] = round(lin / 2**20, 1)
    results[0]["bytes_per_weight"] = 2.0
    for r in results:
        r["other_weights_mib"] = round(other / 2**20, 1)  # embeddings, tied lm_head, norms: dense in both
    speedup = results[0]["tpot_ms"] / results[1]["tpot_ms"]
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                          "python": platform.python_version()},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "results": results, "decode_speedup": round(speedup, 2)}
    try:
        from duoserve.kernels import cpu
        from duoserve.kernels.bench import cpu_model
        report["machine"]["cpu"] = cpu_model()  # the CPU family matters (docs/environment.md)
        report["machine"]["kernel_isa"] = cpu.isa()
        if cpu.available():  # measured in this process; the server measures its own, on the same CPU
            report["machine"]["kernel_decoder"] = cpu.decoder()
            report["machine"]["kernel_prefetch"] = cpu.prefetch_mode()
    except Exception:  # reporting only
        pass
    print(f"\n{'':14s}{'decode tok/s':>14s}{'TPOT ms':>10s}{'TTFT ms':>10s}{'linear MiB':>12s}{'other MiB':>11s}"
          f"{'load':>8s}")
    for r in results:
        print(f"{r['label']:14s}{r['decode_tok_s']:>14.1f}{r['tpot_ms']:>10.2f}{r['ttft_ms']:>10.1f}"
              f"{r.get('linear_weights_mib', float('nan')):>12.1f}{r['other_weights_mib']:>11.1f}"
              f"{r['loadavg_before'][0]:>8.2f}")
    print(f"decode speedup (dense TPOT / dual-sparse TPOT): {speedup:.2f}x")
    print(f"TTFT ratio (dual-sparse / dense): {results[1]['ttft_ms'] / results[0]['ttft_ms']:.2f}x")
    for r in results:
        if "profile_ms_per_request" in r:
            print(f"profile, ms per request ({r['label']}): "
                  + ", ".join(f"{k} {v}" for k, v in r["profile_ms_per_request"].items()))
    if args.breakdown:
        report["linear_breakdown"] = b = linear_breakdown(sparse)
        print(f"linears only, one token, batch 1: dense {b['linears_dense_ms']} ms, duoserve {b['linears_duoserve_ms']} ms "
              f"({b['linears_speedup']}x, {b['op_calls_per_token']} op calls)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # vLLM spawns processes
    sys.exit(main())
