"""The servers a benchmark targets: a running endpoint (URL) or a model folder started here.

Folders are started through duoserve's launcher (duoserve.loaders.server), the only part of
duoserve that knows how to run vLLM; this package itself talks HTTP only. Load traffic goes to
loopback addresses unless the caller explicitly allows another host, so a benchmark never loads
a machine by accident.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests

from duoserve.errors import InputError
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
        """Resident memory of the server's whole process group (Linux; only for servers started here)."""
        if self.handle is None or not Path("/proc").is_dir():
            return None
        return process_group_rss(self.handle.pid)

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


def process_group_rss(pgid: int) -> int | None:
    total, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the name may hold spaces
            if int(fields[2]) != pgid:  # field 5 of stat (pgrp), after pid and (comm)
                continue
            for line in (stat.parent / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    found = True
        except (OSError, IndexError, ValueError):
            continue  # the process ended while we looked
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
    try:
        from duoserve.loaders.server import launch
    except ImportError as e:
        raise InputError(f"starting a server for {folder} needs duoserve.loaders.server ({e}); start the "
                         f"servers yourself and pass their URLs") from e
    start = start or StartOptions()
    log_path = None
    if start.log_dir is not None:
        start.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = start.log_dir / f"{label}_vllm.log"
    handle = launch(folder, host="127.0.0.1", port=0, api_key=api_key, extra_vllm_args=start.extra_vllm_args,
                    served_model_name=f"{label}-{folder.resolve().name}", enforce_eager=start.enforce_eager,
                    kv_cache_gib=start.kv_cache_gib, max_model_len=start.max_model_len, log_path=log_path)
    try:
        handle.wait_ready(timeout=start.ready_timeout_s)
    except BaseException:
        handle.stop()
        raise
    return Target(label, handle.base_url, handle.api_key, handle.model, source=str(folder), folder=folder,
                  handle=handle)


def default_api_key() -> str | None:
    return os.environ.get("DUOSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY") or None
