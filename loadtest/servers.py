"""The servers a benchmark targets: a running endpoint (URL) or a model folder started here.

A folder is started with the public command, `python -m duoserve.cli serve FOLDER ...` (vLLM with
the duoserve plugin), in a process of its own, and measured like any endpoint: this package talks
HTTP only and imports nothing of duoserve's serving side (tests/test_boundaries.py). Load traffic
goes to loopback addresses unless the caller explicitly allows another host, so a benchmark never
loads a machine by accident.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

from duoserve.errors import DuoserveError, InputError
from duoserve.loadtest.client import EndpointError, base_url, served_model

log = logging.getLogger(__name__)


def is_loopback(url: str) -> bool:
    host = urlsplit(base_url(url)).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_target_host(url: str, allow_remote: bool) -> None:
    if not allow_remote and not is_loopback(url):
        raise InputError(f"{url} is not a loopback address; load tests target 127.0.0.1/localhost unless you "
                         "pass --allow-remote (only for endpoints you are allowed to load)")


@dataclass
class StartOptions:
    """How folders are started (the same for dense and sparse, so the comparison is fair)."""

    max_model_len: int | None = 1024
    enforce_eager: bool = False
    kv_cache_gib: float | None = None
    extra_vllm_args: list[str] = field(default_factory=list)
    ready_timeout_s: float = 900.0
    log_dir: Path | None = None


class Target:
    """One server under test; `stop()` ends it if it was started here."""

    def __init__(self, label: str, url: str, api_key: str | None, model: str, source: str,
                 folder: Path | None = None, handle=None):
        self.label, self.url, self.api_key, self.model = label, base_url(url), api_key, model
        self.source, self.folder, self.handle = source, folder, handle

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.handle is not None:
            log.info("stopping the %s server", self.label)
            self.handle.stop()
            self.handle = None

    def rss_bytes(self) -> int | None:
        """Resident memory of the server's processes: every descendant of the `duoserve serve`
        command (vLLM and its workers, not the command itself; Linux; only servers started here)."""
        if self.handle is None or not Path("/proc").is_dir():
            return None
        return process_tree_rss(self.handle.pid)

    def describe(self) -> dict:
        d = {"label": self.label, "url": self.url, "model": self.model, "source": self.source,
             "started_here": self.handle is not None}
        if self.folder is not None:
            d["weights_bytes"] = sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))
            qc = _quantization_config(self.folder)
            # The per-module table (hundreds of entries) belongs to the checkpoint, not the report.
            d["quantization_config"] = {k: v for k, v in qc.items() if k != "modules"} if qc else None
        return d


def _quantization_config(folder: Path) -> dict | None:
    import json

    try:
        return json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None


def _proc_stat(stat: Path) -> list[str]:
    return stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"; the name may hold spaces


def process_tree_rss(root: int) -> int | None:
    """Summed VmRSS of the descendants of process `root` (not `root` itself)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(_proc_stat(stat)[1]), []).append(int(stat.parent.name))  # ppid
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
    total, found, todo = 0, False, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    found = True
        except (OSError, IndexError, ValueError):
            continue
    return total if found else None


def wait_for_endpoint(url: str, api_key: str | None, timeout_s: float = 60.0) -> str:
    """Wait until /v1/models answers; returns the served model. A refused key fails at once."""
    deadline = time.monotonic() + timeout_s
    last = ""
    with requests.Session() as s:
        while True:
            try:
                return served_model(s, url, api_key)
            except EndpointError as e:
                if e.status in (401, 403):
                    raise InputError(f"{url} refused the API key ({e}); pass --api-key or set DUOSERVE_API_KEY")
                last = str(e)
            if time.monotonic() > deadline:
                raise InputError(f"{url} did not answer /v1/models within {timeout_s:.0f} s: {last}")
            time.sleep(1.0)


def open_target(label: str, spec: str, api_key: str | None, *, allow_remote: bool = False,
                start: StartOptions | None = None) -> Target:
    """A running endpoint (spec is an http(s) URL) or a model folder started with the launcher."""
    if spec.startswith(("http://", "https://")):
        check_target_host(spec, allow_remote)
        model = wait_for_endpoint(spec, api_key)
        log.info("%s: endpoint %s serves %s", label, base_url(spec), model)
        return Target(label, spec, api_key, model, source=base_url(spec))
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise InputError(f"--{label} {spec!r} is neither an http(s) URL nor a model folder with config.json")
    start = start or StartOptions()
    handle = start_server(label, folder, api_key, start)
    try:
        handle.wait_ready(start.ready_timeout_s)
    except BaseException:
        handle.stop()
        raise
    return Target(label, handle.base_url, handle.api_key, handle.model, source=str(folder), folder=folder,
                  handle=handle)


# The public command that serves a folder (vLLM + the duoserve plugin); a test may point it elsewhere.
SERVE_COMMAND = [sys.executable, "-m", "duoserve.cli", "serve"]


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StartedServer:
    """A `duoserve serve` process started by start_server; `stop()` ends it (and so its vLLM)."""

    def __init__(self, proc: subprocess.Popen, port: int, api_key: str, model: str, log_path: Path, log_file):
        self.proc, self.api_key, self.model, self.log_path = proc, api_key, model, log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self._log_file = log_file

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float) -> None:
        """Until /v1/models answers with the served model; the command's exit or a timeout raises
        with the log's tail (exit code 2: the command refused its input, e.g. a bad checkpoint)."""
        deadline = time.monotonic() + timeout_s
        with requests.Session() as s:
            while True:
                code = self.proc.poll()
                if code is not None:
                    kind = InputError if code == 2 else DuoserveError
                    raise kind(f"`duoserve serve` exited with code {code} before it was ready. Last log lines "
                               f"({self.log_path}):\n{self.log_tail()}")
                try:
                    served_model(s, self.base_url, self.api_key)
                    return
                except EndpointError:
                    pass
                if time.monotonic() > deadline:
                    raise DuoserveError(f"the server did not become ready within {timeout_s:.0f} s. Last log "
                                        f"lines ({self.log_path}):\n{self.log_tail()}")
                time.sleep(1.0)

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM the command (it stops vLLM's process group, which takes up to ~30 s), SIGKILL
        what is left of its own group after `grace_s`."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("`duoserve serve` (pid %d) did not stop within %.0f s; killing it", self.pid, grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def start_server(label: str, folder: Path, api_key: str | None, start: StartOptions) -> StartedServer:
    """Start `duoserve serve FOLDER` on a free loopback port in its own process group; returns at once."""
    extra = list(start.extra_vllm_args)
    api_key = api_key or secrets.token_hex(24)  # hex: never starts with '-'
    model = f"{label}-{folder.resolve().name}"
    port = free_port()
    if start.log_dir is not None:
        start.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = start.log_dir / f"{label}_vllm.log"
    else:
        log_path = Path(tempfile.mkstemp(prefix=f"duoserve-{model}-", suffix=".log")[1])
    cmd = [*SERVE_COMMAND, str(folder), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", model,
           "--ready-timeout", str(start.ready_timeout_s), "--log-file", str(log_path)]
    if start.enforce_eager and not _has_flag(extra, "--enforce-eager"):
        cmd.append("--enforce-eager")
    if start.max_model_len and not _has_flag(extra, "--max-model-len"):
        cmd += ["--max-model-len", str(start.max_model_len)]
    if start.kv_cache_gib is not None and not _has_flag(extra, "--kv-cache-gib"):
        cmd += ["--kv-cache-gib", str(start.kv_cache_gib)]
    cmd += extra
    # The key goes through the environment, not argv (which every user of the machine can read).
    env = {**os.environ, "DUOSERVE_API_KEY": api_key}
    log_file = open(log_path, "ab")  # the command's own messages; vLLM appends its log to the same file
    log.info("starting %s for %s on 127.0.0.1:%d, log %s", label, folder, port, log_path)
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    return StartedServer(proc, port, api_key, model, log_path, log_file)


def default_api_key() -> str | None:
    return os.environ.get("DUOSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY") or None
