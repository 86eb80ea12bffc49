"""Run the locust file headless for one concurrency level, as a child process with a hard bound.

A child process per level because locust monkeypatches the standard library for gevent at
import time, which the driver (and pytest) must not inherit, and because a fresh process starts
every level from the same state. The child stops itself (--run-time / --max-requests); the
parent kills its process group if it overruns anyway.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from duoserve.errors import DuoserveError

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass(frozen=True)
class LoadSpec:
    """What every level of a sweep sends (the same for the dense and the sparse server)."""

    api: str = "chat"
    stream: bool = True
    prompt_source: str = "c4"
    prompt_words: int = 64
    max_tokens: int = 64
    natural_length: bool = False
    seed: int = 0
    duration_s: float = 60.0
    max_requests: int = 0  # 0: the duration alone bounds a level
    request_timeout_s: float = 120.0

    def __post_init__(self):
        if self.api not in ("chat", "completions"):
            raise DuoserveError(f"--api must be chat or completions, got {self.api!r}")
        if self.prompt_words <= 0 or self.max_tokens <= 0:
            raise DuoserveError("--prompt-words and --max-tokens must be positive")
        if self.duration_s <= 0 or self.request_timeout_s <= 0 or self.max_requests < 0:
            raise DuoserveError("--duration and --request-timeout must be positive, --max-requests >= 0")


def locust_command(url: str, users: int, spec: LoadSpec, csv_prefix: Path, records_csv: Path,
                   model: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
           "--host", url, "-u", str(users), "-r", str(users), "-t", f"{int(round(spec.duration_s))}s",
           # Let requests in flight at the time limit finish (bounded by the request timeout),
           # so the last requests of a level are measured, not cut off.
           "--stop-timeout", str(int(spec.request_timeout_s)),
           "--csv", str(csv_prefix), "--records-csv", str(records_csv), "--exit-code-on-error", "0",
           "--api", spec.api, "--prompt-source", spec.prompt_source, "--prompt-words", str(spec.prompt_words),
           "--max-tokens", str(spec.max_tokens), "--seed", str(spec.seed),
           "--request-timeout", str(spec.request_timeout_s), "--max-requests", str(spec.max_requests)]
    if not spec.stream:
        cmd.append("--no-stream")
    if spec.natural_length:
        cmd.append("--natural-length")
    if model:
        cmd += ["--model", model]
    return cmd


def run_level(url: str, users: int, spec: LoadSpec, out_dir: Path, api_key: str | None = None,
              model: str | None = None) -> Path:
    """Run one level; returns the per-request CSV. Locust's own CSVs land next to it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = out_dir / f"u{users}_requests.csv"
    if records.exists():
        records.unlink()  # the locust file appends; a rerun must not mix in an older run
    cmd = locust_command(url, users, spec, out_dir / f"u{users}", records, model)
    env = dict(os.environ)
    if api_key:
        env["LOCUST_API_KEY"] = api_key  # not on the command line, where `ps` would show it
    # Hard bound: the run time, the time in-flight requests may still take, and startup slack.
    limit = spec.duration_s + spec.request_timeout_s + 60.0
    log.info("locust: %d user(s) against %s for up to %gs%s", users, url, spec.duration_s,
             f" or {spec.max_requests} requests" if spec.max_requests else "")
    with open(out_dir / f"u{users}_locust.log", "w", encoding="utf-8") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise DuoserveError(f"locust did not stop within {limit:.0f}s at {users} users; "
                                f"see {out_dir / f'u{users}_locust.log'}")
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # Ctrl-C in the driver: leave no load generator behind
            proc.wait()
            raise
    if rc != 0 or not records.is_file():
        tail = (out_dir / f"u{users}_locust.log").read_text(encoding="utf-8", errors="replace")[-1500:]
        raise DuoserveError(f"locust exited with code {rc} at {users} users against {url}:\n{tail}")
    return records
