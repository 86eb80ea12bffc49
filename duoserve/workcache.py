"""Cached results of long commands in a work folder (scripts/prune_table.py's pattern, as a module).

Each finished step (a prune, an evaluation, a served measurement) leaves one JSON file under the
work folder; a rerun reads it instead of running the step again, so an interrupted run resumes
where it stopped. Results are written atomically (temp file + rename): a step killed halfway
leaves no result, and runs again. Steps are `duoserve` commands run in subprocesses, so their wall
time and memory are those of the real commands, and their output goes to a log file per step.

Cheap imports only (the CLI imports this for --help).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from duoserve.errors import DuoserveError

# `python -m duoserve.cli`: the public command line, in the interpreter that runs this.
DUOSERVE = [sys.executable, "-m", "duoserve.cli"]


class NotCached(Exception):
    """A result that is not in the work folder while only cached results are wanted."""


class StepFailed(DuoserveError):
    """A step's command failed; the message names the command and its log."""

    exit_code = 1


def slug(text: str) -> str:
    """A file-name-safe form of a value ('0.5' stays '0.5', '2:4' -> '2of4', '/a/b c' -> 'a_b_c')."""
    text = str(text).replace(":", "of")
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "x"


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    """The JSON at path, or None when it is missing or unreadable (a half-written file from an older
    non-atomic writer counts as missing, so the step runs again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cached(path: Path, compute: Callable[[], dict], cached_only: bool = False) -> dict:
    """The result stored at `path`, else compute() stored there; NotCached if cached_only."""
    result = read_json(path)
    if result is not None:
        return result
    if cached_only:
        raise NotCached(path.name)
    result = compute()
    write_json_atomic(path, result)
    return result


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run cmd with its stdout and stderr in `log`; returns the wall seconds. StepFailed if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise StepFailed(f"command failed with exit code {proc.returncode} (log {log}):\n  {' '.join(cmd)}\n{tail}")
    return time.time() - t0


def prune_flags(checkpoint: Path, summary: Path) -> list[str]:
    """How to (re)start `duoserve prune -o CHECKPOINT`: resume an interrupted run (CHECKPOINT.partial
    exists, no checkpoint yet), replace a checkpoint whose run left no summary, or start fresh."""
    if checkpoint.exists():
        return ["--overwrite"]
    if checkpoint.with_name(checkpoint.name + ".partial").exists():
        return ["--resume"]
    return []
