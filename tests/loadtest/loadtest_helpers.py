"""Helpers shared by the load-test tests: run the locust file headless as a bounded child process."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

from duoserve.loadtest.runner import LOCUSTFILE


def run_locust(url, out, *args, timeout=60, env=None):
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", "--host", url,
           "--csv", str(out / "run"), "--records-csv", str(out / "requests.csv"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def stats_rows(prefix):
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
