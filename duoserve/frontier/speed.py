"""Speed of one point from the served endpoint, with the loadtest package's API.

The folder is started with the public command (`duoserve serve FOLDER --activation-sparsity P`,
through duoserve.loadtest.servers), warmed up with two requests, asked the fixed prompts greedily
(the rule's answers), then loaded with locust at 1 user (batch-1 TPOT: what one user feels) and at
--throughput-users users (output token throughput), each level bounded by --duration. The server
is stopped before the next point starts, so points never compete for the machine.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedSettings:
    """What every point's measurement uses (part of the cache key)."""

    throughput_users: int = 4
    duration_s: float = 30.0
    max_tokens: int = 64
    prompt_words: int = 64
    answer_tokens: int = 64
    max_model_len: int = 1024
    enforce_eager: bool = False
    kv_cache_gib: float | None = None

    def key(self) -> str:
        return (f"u{self.throughput_users}-d{self.duration_s:g}-t{self.max_tokens}-p{self.prompt_words}"
                f"-a{self.answer_tokens}-l{self.max_model_len}{'-eager' if self.enforce_eager else ''}"
                f"{f'-kv{self.kv_cache_gib:g}' if self.kv_cache_gib is not None else ''}")


def host() -> dict:
    """The machine, for the report: CPU model, cores, and the bf16 matrix features."""
    cpu, flags = "", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "machine": platform.machine(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def measure(folder: Path, label: str, serve_px: float | None, settings: SpeedSettings, out_dir: Path) -> dict:
    """Serve `folder` (at serve_px when given), measure it and return the numbers and the answers."""
    from duoserve.frontier.answers import FIXED_PROMPTS, endpoint_answers
    from duoserve.loadtest.metrics import read_records, summarize
    from duoserve.loadtest.runner import LoadSpec, run_level, warm_up
    from duoserve.loadtest.servers import StartOptions, open_target

    extra = ["--activation-sparsity", f"{serve_px:g}"] if serve_px is not None else []
    start = StartOptions(max_model_len=settings.max_model_len, enforce_eager=settings.enforce_eager,
                         kv_cache_gib=settings.kv_cache_gib, extra_vllm_args=extra, log_dir=out_dir)
    spec = LoadSpec(prompt_words=settings.prompt_words, max_tokens=settings.max_tokens,
                    duration_s=settings.duration_s)
    t0 = time.time()
    levels = {}
    with open_target(label, str(folder), None, start=start) as target:
        started = time.time() - t0
        warm_up(target, spec)
        answers = endpoint_answers(target.url, target.api_key, target.model, FIXED_PROMPTS, settings.answer_tokens)
        for users in sorted({1, settings.throughput_users}):
            load = os.getloadavg()[0]
            records = run_level(target.url, users, spec, out_dir, target.api_key, target.model)
            s = summarize(read_records(records))
            levels[str(users)] = {"requests": s["requests"], "failures": s["failures"],
                                  "token_throughput": s["token_throughput"],
                                  "tpot_median_s": s["tpot_s"]["median"], "ttft_median_s": s["ttft_s"]["median"],
                                  "load_before": load, "load_after": os.getloadavg()[0]}
    one, many = levels["1"], levels[str(settings.throughput_users)]

    def finite(x):
        return x if x is not None and math.isfinite(x) else None

    return {"tpot_s": finite(one["tpot_median_s"]), "ttft_s": finite(one["ttft_median_s"]),
            "throughput": finite(many["token_throughput"]), "throughput_users": settings.throughput_users,
            "levels": levels, "answers": answers, "answers_from": "endpoint (chat, greedy)",
            "server_start_s": round(started, 1), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "host": host()}
