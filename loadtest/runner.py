"""Run the locust file headless for one concurrency level, as a child process with a hard bound.

A child process per level because locust monkeypatches the standard library for gevent at
import time, which the driver (and pytest) must not inherit, and because a fresh process starts
every level from the same state. The child stops itself (--run-time / --max-requests); the
parent kills its process group if it overruns anyway.

With Distribution(processes=N > 1) or remote workers, a level runs in locust's distributed mode:
a master (which sends no requests; it aggregates locust's statistics and, through the locust
file's messages, writes every worker's per-request rows) and N local worker processes, plus
workers on other machines that connect to --master-bind-host:--master-port (run_workers).
Local workers are separate `locust --worker` processes rather than locust's own --processes
fork: with --processes locust expects exactly its forks and no remote worker.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from duoserve.errors import DuoserveError

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# Seconds a master waits for its workers to connect before it gives up (locust exits with 1).
WORKER_WAIT_S = 60


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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Distribution:
    """How many load-generating processes a level uses (the default: one, no master)."""

    processes: int = 1  # locust worker processes on this machine
    remote_workers: int = 0  # workers on other machines each level waits for
    master_bind_host: str = "127.0.0.1"  # where the master listens; loopback unless workers are remote
    master_port: int = 0  # 0: a free port (local workers only)

    def __post_init__(self):
        if self.processes < 1:
            raise DuoserveError(f"--processes must be at least 1 (1: one locust process), got {self.processes}")
        if self.remote_workers < 0:
            raise DuoserveError(f"--remote-workers must be >= 0, got {self.remote_workers}")
        if not 0 <= self.master_port <= 65535:
            raise DuoserveError(f"--master-port must be a TCP port (1-65535), got {self.master_port}")
        if not self.master_bind_host:
            raise DuoserveError("--master-bind-host must not be empty")
        if self.remote_workers:
            if _is_loopback(self.master_bind_host):
                raise DuoserveError(f"--remote-workers {self.remote_workers}: workers on other machines cannot "
                                    f"reach a master bound to {self.master_bind_host}; pass --master-bind-host "
                                    "(an address of this machine they can reach, or 0.0.0.0)")
            if not self.master_port:
                raise DuoserveError("--remote-workers needs a fixed --master-port (the workers connect to it)")

    def local_workers(self, users: int) -> int:
        """Worker processes on this machine at `users`; 0 means one plain locust process."""
        if self.remote_workers:
            return self.processes
        n = min(self.processes, users)  # a worker without a user would only idle
        return n if n > 1 else 0

    def connect_host(self) -> str:
        """The address local workers connect to."""
        return "127.0.0.1" if self.master_bind_host in ("*", "0.0.0.0", "::") else self.master_bind_host


def _free_port(host: str) -> int:
    host = "0.0.0.0" if host == "*" else host
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def worker_command(master_host: str, master_port: int) -> list[str]:
    """A locust worker of the locust file (it takes every other option from the master)."""
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker", "--master-host", master_host,
            "--master-port", str(master_port)]


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


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def warm_up(target, spec: LoadSpec) -> None:
    """Two requests to a server (`target`: url, model, api_key, label) before measuring it: the first
    pays for lazy initialisation; both must succeed."""
    import requests

    from duoserve.loadtest.client import build_payload, send
    from duoserve.loadtest.prompts import PromptSampler

    sampler = PromptSampler.from_source(spec.prompt_source, spec.prompt_words, seed="warmup")
    with requests.Session() as s:
        for _ in range(2):
            body = build_payload(spec.api, target.model, sampler.sample(), spec.max_tokens, stream=spec.stream,
                                 fixed_length=not spec.natural_length)
            rec = send(s, target.url, spec.api, body, target.api_key, spec.request_timeout_s)
            if not rec.ok:
                raise DuoserveError(f"the {target.label} server at {target.url} failed a warm-up request: {rec.error}")


def run_level(url: str, users: int, spec: LoadSpec, out_dir: Path, api_key: str | None = None,
              model: str | None = None, dist: Distribution = Distribution()) -> Path:
    """Run one level; returns the per-request CSV. Locust's own CSVs land next to it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    records = out_dir / f"u{users}_requests.csv"
    if records.exists():
        records.unlink()  # the locust file appends; a rerun must not mix in an older run
    cmd = locust_command(url, users, spec, out_dir / f"u{users}", records, model)
    n_local = dist.local_workers(users)
    distributed = n_local + dist.remote_workers > 0
    port = 0
    if distributed:
        port = dist.master_port or _free_port(dist.master_bind_host)
        cmd += ["--master", "--master-bind-host", dist.master_bind_host, "--master-bind-port", str(port),
                "--expect-workers", str(n_local + dist.remote_workers),
                "--expect-workers-max-wait", str(WORKER_WAIT_S)]
    env = dict(os.environ)
    if api_key:
        env["LOCUST_API_KEY"] = api_key  # not on the command line, where `ps` would show it
    # Hard bound: the run time, the time in-flight requests may still take, and startup slack
    # (plus, distributed, the wait for workers and for their last requests).
    limit = spec.duration_s + spec.request_timeout_s + 60.0 + (WORKER_WAIT_S + 15.0 if distributed else 0.0)
    log.info("locust: %d user(s) against %s for up to %gs%s%s", users, url, spec.duration_s,
             f" or {spec.max_requests} requests" if spec.max_requests else "",
             f", {n_local} local + {dist.remote_workers} remote worker(s), master on "
             f"{dist.master_bind_host}:{port}" if distributed else "")
    log_path = out_dir / f"u{users}_locust.log"
    worker_logs = [out_dir / f"u{users}_worker{k}.log" for k in range(n_local)]
    with open(log_path, "w", encoding="utf-8") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        workers = []
        try:
            for wl in worker_logs:  # each in its own session too (a process cannot join another's group)
                with open(wl, "w", encoding="utf-8") as wf:
                    workers.append(subprocess.Popen(worker_command(dist.connect_host(), port), stdout=wf,
                                                    stderr=subprocess.STDOUT, env=env, start_new_session=True))
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                raise DuoserveError(f"locust did not stop within {limit:.0f}s at {users} users; "
                                    f"see {log_path}") from None
            deadline = time.monotonic() + 15.0  # workers quit when their master tells them to
            for w in workers:
                try:
                    w.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("a locust worker at %d users did not quit with its master; killed", users)
        except BaseException:
            _kill_group(proc.pid)  # overrun, or Ctrl-C in the driver: leave no load generator behind
            proc.wait()
            raise
        finally:
            for w in workers:
                if w.poll() is None:
                    _kill_group(w.pid)
                    w.wait()
    if rc != 0 or not records.is_file():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-1500:]
        for wl in worker_logs:
            tail += f"\n--- {wl.name}:\n" + wl.read_text(encoding="utf-8", errors="replace")[-500:]
        raise DuoserveError(f"locust exited with code {rc} at {users} users against {url}:\n{tail}")
    return records


def run_workers(master: str, processes: int, rounds: int = 0) -> int:
    """Serve the levels of a `duoserve bench` master on another machine: start `processes`
    locust workers connected to master ("HOST:PORT"), wait until its level ends (the master quits
    its workers), start them again for the next level; stop after `rounds` levels (0: until
    interrupted). Returns 0, or raises when the workers cannot run at all."""
    host, port = parse_master(master)
    if processes < 1:
        raise DuoserveError(f"--processes must be at least 1, got {processes}")
    done = 0
    while not rounds or done < rounds:
        t0 = time.monotonic()
        procs = [subprocess.Popen(worker_command(host, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True) for _ in range(processes)]
        try:
            outs = [p.communicate()[0] for p in procs]
        except BaseException:
            for p in procs:
                _kill_group(p.pid)
                p.wait()
            raise
        if all(p.returncode != 0 for p in procs) and time.monotonic() - t0 < 10.0:
            raise DuoserveError(f"locust workers for {host}:{port} exited at once:\n{outs[0][-1500:]}")
        done += 1
        log.info("level %d served by %d worker(s) (exit codes %s)", done, processes, [p.returncode for p in procs])
    return 0


def parse_master(text: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') -> (host, port)."""
    host, sep, port = (text or "").strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DuoserveError(f"a worker needs its master's address as HOST:PORT (e.g. 10.0.0.5:5557), got {text!r}")
    return host, int(port)
