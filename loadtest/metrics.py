"""Per-request records and the statistics the reports use.

Metric definitions: DEFINITIONS below (they follow vLLM's serving benchmark, so numbers compare
with its reports).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

DEFINITIONS = """\
- TTFT: request sent -> first streamed event that carries output text.
- E2E: request sent -> last byte of the response.
- TPOT: (E2E - TTFT) / (output_tokens - 1), per request; undefined for one-token outputs.
- ITL: time between consecutive streamed events that carry output text (one value per gap,
  pooled over requests). vLLM streams one event per token by default; a server that batches
  several tokens into one event shows fewer, longer gaps, while TPOT stays per token.
- output tokens/s (per request): output_tokens / E2E. The run-level token throughput is the total
  output tokens of successful requests over the run's wall time.

Non-streamed requests have no TTFT, TPOT or ITL; they contribute E2E and tokens/s.
"""

# Column order of the per-request CSV written by the locust file and read by the report.
RECORD_FIELDS = ["start", "users", "api", "stream", "ok", "status", "error", "prompt_tokens",
                 "output_tokens", "ttft_s", "tpot_s", "e2e_s", "tokens_per_s", "itl_s", "worker"]
# "worker": the locust worker index that sent the request in a distributed run, empty otherwise;
# optional on reading, so CSVs written before it existed still load.
OPTIONAL_FIELDS = {"worker"}
METRICS = ("ttft_s", "tpot_s", "itl_s", "e2e_s", "tokens_per_s")
METRIC_LABELS = {"ttft_s": "TTFT (ms)", "tpot_s": "TPOT (ms)", "itl_s": "ITL (ms)", "e2e_s": "E2E latency (ms)",
                 "tokens_per_s": "output tokens/s per request"}


@dataclass
class RequestRecord:
    start: float  # wall-clock time the request was sent (epoch seconds)
    api: str  # "chat" or "completions"
    stream: bool
    ok: bool = False
    status: int = 0  # HTTP status; 0 when no response arrived (timeout, refused connection)
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    users: int = 0  # concurrency the request ran under (filled in by the load generator)

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        if self.output_tokens <= 0 or self.e2e_s <= 0:
            return None
        return self.output_tokens / self.e2e_s

    def row(self) -> dict:
        def num(x):
            return "" if x is None else f"{x:.6f}"
        return {"start": f"{self.start:.6f}", "users": self.users, "api": self.api, "stream": int(self.stream),
                "ok": int(self.ok), "status": self.status, "error": self.error[:300].replace("\n", " "),
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "ttft_s": num(self.ttft_s), "tpot_s": num(self.tpot_s), "e2e_s": num(self.e2e_s),
                "tokens_per_s": num(self.tokens_per_s), "itl_s": " ".join(f"{x:.6f}" for x in self.itl_s),
                "worker": ""}


def read_records(path: Path) -> list[dict]:
    """Rows of a per-request CSV with numbers parsed (None where empty; itl_s as a list)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = set(RECORD_FIELDS) - OPTIONAL_FIELDS - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a duoserve request CSV (missing columns {sorted(missing)})")
        for r in reader:
            row = dict(r)
            for k in ("start", "ttft_s", "tpot_s", "e2e_s", "tokens_per_s"):
                row[k] = float(r[k]) if r[k] else None
            for k in ("users", "ok", "status", "prompt_tokens", "output_tokens", "stream"):
                row[k] = int(r[k])
            row["itl_s"] = [float(x) for x in r["itl_s"].split()]
            row["worker"] = r.get("worker") or ""
            rows.append(row)
    return rows


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def describe(values: list[float]) -> dict:
    """count, mean, median, p90, p99 (NaN when empty)."""
    n = len(values)
    return {"count": n, "mean": sum(values) / n if n else math.nan, "median": percentile(values, 50),
            "p90": percentile(values, 90), "p99": percentile(values, 99)}


def summarize(rows: list[dict]) -> dict:
    """Run-level numbers for one (server, concurrency) from its per-request rows."""
    ok = [r for r in rows if r["ok"]]
    out = {"requests": len(rows), "ok": len(ok), "failures": len(rows) - len(ok)}
    # Wall time from the first request sent to the last one finished (successful or not).
    if rows:
        t0 = min(r["start"] for r in rows)
        t1 = max(r["start"] + (r["e2e_s"] or 0.0) for r in rows)
        wall = max(t1 - t0, 1e-9)
    else:
        wall = math.nan
    out["wall_s"] = wall
    out["request_throughput"] = len(ok) / wall if rows else math.nan
    out["token_throughput"] = sum(r["output_tokens"] for r in ok) / wall if rows else math.nan
    out["mean_prompt_tokens"] = sum(r["prompt_tokens"] for r in ok) / len(ok) if ok else math.nan
    out["mean_output_tokens"] = sum(r["output_tokens"] for r in ok) / len(ok) if ok else math.nan
    for m in METRICS:
        if m == "itl_s":
            values = [x for r in ok for x in r["itl_s"]]
        else:
            values = [r[m] for r in ok if r[m] is not None]
        out[m] = describe(values)
    errors: dict[str, int] = {}
    for r in rows:
        if not r["ok"]:
            key = f"HTTP {r['status']}" if r["status"] else (r["error"].split(":")[0] or "error")
            errors[key] = errors.get(key, 0) + 1
    out["errors"] = errors
    return out
