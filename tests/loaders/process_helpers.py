"""Running duoserve commands from the serving tests: each in its own process group, its output
collected, killed with the vLLM server it started. A plain module, imported by name: the test
folders each have a conftest.py, and `from conftest import ...` got whichever one was loaded last."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time


def kill_group(pid: int, grace: float = 15.0) -> None:
    """SIGTERM a process group, SIGKILL it after `grace` seconds (tests never leave servers behind)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class LineReader:
    """Collects a process's stdout lines in a background thread (no select on a buffered pipe)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, needle: str, timeout: float) -> str:
        """The first line containing `needle`; fail with the output on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.5)
        tail = "".join(self.lines[-40:])
        raise AssertionError(f"{needle!r} not seen within {timeout:.0f} s (exit code {self.proc.poll()}):\n{tail}")


@contextlib.contextmanager
def duoserve_cli(args: list[str], env: dict[str, str] | None = None):
    """`python -m duoserve.cli ARGS` in its own process group, stdout and stderr collected
    (unbuffered) by a LineReader: yields (proc, reader). On exit the command's group is killed, and
    the group of the vLLM server it started (the launcher logs "vLLM pid N" first), whatever state
    the command is in: tests never leave servers behind."""
    proc = subprocess.Popen([sys.executable, "-m", "duoserve.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    out = LineReader(proc)
    try:
        yield proc, out
    finally:
        kill_group(proc.pid)
        started = [re.search(r"vLLM pid (\d+)", line) for line in list(out.lines)]
        for m in filter(None, started):
            kill_group(int(m.group(1)), grace=5)
        if proc.stdout:
            proc.stdout.close()
