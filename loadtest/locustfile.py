"""Locust load test for OpenAI-compatible LLM endpoints (vLLM, duoserve serve, others).

Web UI:   locust -f $(python -c 'import duoserve.loadtest.locustfile as m; print(m.__file__)') \
                 --host http://127.0.0.1:8000 --web-host 127.0.0.1
Headless: locust -f <same path> --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000 \
                 --csv out/run --max-tokens 64 --prompt-words 64 --api chat

Each user is a closed loop: it sends the next request as soon as the previous one finished, so
the user count is the request concurrency. Besides the request itself ("POST", named after the
API, failures included with the server's reason) every successful request fires one locust event
per metric, so they appear in the web UI, in --csv's <prefix>_stats.csv and in --html:
  TTFT, TPOT, E2E (milliseconds), ITL (milliseconds, one event per gap between streamed tokens),
  TOKENS_PER_S (the "response time" column holds output tokens per second of that request).
Locust buckets response times (2 significant digits above 100), so --records-csv additionally
writes one exact row per request (duoserve.loadtest.metrics.RECORD_FIELDS); the reports use it.

Every run stops by itself when -t/--run-time is reached or after --max-requests requests, and
every request is bounded by --request-timeout.
"""
from __future__ import annotations

import csv
import itertools
import logging
import os

import gevent
import requests
from locust import User, events, task
from locust.stats import CSV_STATS_INTERVAL_SEC

from duoserve.errors import DuoserveError
from duoserve.loadtest import client
from duoserve.loadtest.metrics import RECORD_FIELDS
from duoserve.loadtest.prompts import PromptSampler

log = logging.getLogger("duoserve.loadtest")

# Per-process run state, rebuilt at every test start (the web UI can start several tests).
_state: dict = {}


@events.init_command_line_parser.add_listener
def _add_arguments(parser):
    parser.add_argument("--api", choices=["chat", "completions"], default="chat",
                        help="which endpoint: /v1/chat/completions or /v1/completions")
    parser.add_argument("--no-stream", action="store_true", default=False,
                        help="ask for whole responses (then only E2E and tokens/s are measured)")
    parser.add_argument("--model", default="", help="model name to send (default: the first one /v1/models lists)")
    # Kept out of the web UI: locust writes option defaults into the page source, masked or not.
    parser.add_argument("--api-key", default="", include_in_web_ui=False, env_var="LOCUST_API_KEY",
                        help="sent as 'Authorization: Bearer ...' (default: $LOCUST_API_KEY, then $OPENAI_API_KEY)")
    parser.add_argument("--prompt-source", default="c4",
                        help="prompt text: c4 or wiki (real samples packaged in exllamav3) or a .txt/.jsonl/.raw file")
    parser.add_argument("--prompt-words", type=int, default=64, help="prompt length in words of real text")
    parser.add_argument("--max-tokens", type=int, default=64, help="output length in tokens")
    parser.add_argument("--natural-length", action="store_true", default=False,
                        help="let the model stop at EOS (default: exactly --max-tokens via ignore_eos/min_tokens)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the prompt draw (user i draws from the seed '<seed>-<i>')")
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="seconds before a request counts as failed (no hang on an overloaded server)")
    parser.add_argument("--failure-backoff", type=float, default=0.25,
                        help="seconds a user waits after a failure (a refusing server is not hit in a tight loop)")
    parser.add_argument("--max-requests", type=int, default=0,
                        help="stop the test after this many requests (0: only --run-time stops it)")
    parser.add_argument("--records-csv", default="", include_in_web_ui=False,
                        help="also write one exact row per request to this CSV (appended)")


def _finish(environment, reason: str, exit_code: int | None = None) -> None:
    """Stop the run from outside the calling user's greenlet (quit headless, stop in the web UI)."""
    def go():
        log.info("stopping: %s", reason)
        if exit_code is not None:
            environment.process_exit_code = exit_code
        if environment.parsed_options and environment.parsed_options.headless:
            environment.runner.quit()
        else:
            environment.runner.stop()
    gevent.spawn(go)


@events.test_start.add_listener
def _on_test_start(environment, **_kw):
    opts = environment.parsed_options
    _close_records()
    _state.clear()
    try:
        if not environment.host:
            raise DuoserveError("no host: pass --host http://127.0.0.1:PORT (the server's base URL)")
        for name in ("prompt_words", "max_tokens"):
            if getattr(opts, name) <= 0:
                raise DuoserveError(f"--{name.replace('_', '-')} must be positive")
        if opts.request_timeout <= 0 or opts.max_requests < 0 or opts.failure_backoff < 0:
            raise DuoserveError("--request-timeout must be positive, --max-requests and --failure-backoff >= 0")
        api_key = opts.api_key or os.environ.get("OPENAI_API_KEY", "")
        sampler = PromptSampler.from_source(opts.prompt_source, opts.prompt_words, opts.seed)
        model = opts.model or client.served_model(requests.Session(), environment.host, api_key)
    except (DuoserveError, client.EndpointError, ValueError) as e:
        log.error("cannot start the load test: %s", e)
        _finish(environment, "bad configuration", exit_code=2)
        return
    _state.update(api_key=api_key, docs=sampler.docs, model=model, user_index=itertools.count(),
                  issued=0, completed=0, records=None, writer=None)
    if opts.records_csv:
        path = opts.records_csv
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        f = open(path, "a", newline="", encoding="utf-8")  # closed at test stop
        _state["records"], _state["writer"] = f, csv.DictWriter(f, fieldnames=RECORD_FIELDS)
        if new:
            _state["writer"].writeheader()
    log.info("load test: %s %s, model %s, prompts %d words of %s (seed %d), %d output tokens%s",
             opts.api, "non-streamed" if opts.no_stream else "streamed", model, opts.prompt_words,
             opts.prompt_source, opts.seed, opts.max_tokens, "" if opts.natural_length else " (fixed)")


def _close_records():
    f = _state.get("records")
    if f is not None:
        f.close()
        _state["records"] = None


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw):
    _close_records()
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "csv_prefix", None):
        # Locust rewrites its --csv files once a second and not at shutdown, so a run that stops
        # right after a write would lose up to a second of results. Users are stopped by now:
        # give the writer one more pass with the final numbers.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.3)


class OpenAIUser(User):
    """One closed-loop client of an OpenAI-compatible endpoint."""

    last_failed = False

    def wait_time(self):
        return self.environment.parsed_options.failure_backoff if self.last_failed else 0.0

    def on_start(self):
        if not _state:  # test_start refused the configuration; the runner is stopping
            raise gevent.GreenletExit()
        opts = self.environment.parsed_options
        self.session = requests.Session()
        self.index = next(_state["user_index"])
        # Per-user stream of prompts: reproducible for a given (seed, user index).
        self.sampler = PromptSampler(_state["docs"], opts.prompt_words, seed=f"{opts.seed}-{self.index}")

    def on_stop(self):
        if getattr(self, "session", None) is not None:
            self.session.close()

    @task
    def generate(self):
        opts = self.environment.parsed_options
        if opts.max_requests and _state["issued"] >= opts.max_requests:
            raise gevent.GreenletExit()  # this user is done; the last request to finish ends the run
        _state["issued"] += 1
        stream = not opts.no_stream
        body = client.build_payload(opts.api, _state["model"], self.sampler.sample(), opts.max_tokens,
                                    stream=stream, fixed_length=not opts.natural_length,
                                    temperature=opts.temperature)
        rec = client.send(self.session, self.environment.host, opts.api, body, _state["api_key"],
                          opts.request_timeout)
        self.last_failed = not rec.ok
        rec.users = self.environment.runner.user_count if self.environment.runner else 0
        self._report(rec, name=f"{opts.api}{' stream' if stream else ''}")
        _state["completed"] += 1
        if opts.max_requests and _state["completed"] >= opts.max_requests:
            _finish(self.environment, f"--max-requests {opts.max_requests} reached")

    def _report(self, rec, name: str):
        fire = self.environment.events.request.fire
        fire(request_type="POST", name=name, response_time=rec.e2e_s * 1000.0, response_length=rec.output_tokens,
             exception=None if rec.ok else RuntimeError(rec.error), context={"status": rec.status})
        if rec.ok:
            metrics = [("E2E", rec.e2e_s * 1000.0), ("TOKENS_PER_S", rec.tokens_per_s)]
            if rec.ttft_s is not None:
                metrics.append(("TTFT", rec.ttft_s * 1000.0))
            if rec.tpot_s is not None:
                metrics.append(("TPOT", rec.tpot_s * 1000.0))
            metrics += [("ITL", gap * 1000.0) for gap in rec.itl_s]
            for kind, value in metrics:
                fire(request_type=kind, name=name, response_time=value, response_length=rec.output_tokens,
                     exception=None, context={})
        if _state.get("records") is not None:  # None once the test stopped (file closed)
            _state["writer"].writerow(rec.row())
            _state["records"].flush()  # a run killed from outside keeps what it measured
