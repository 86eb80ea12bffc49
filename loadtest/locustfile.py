"""Locust load test for OpenAI-compatible LLM endpoints (vLLM, duoserve serve, others).

Web UI:   locust -f $(python -c 'import duoserve.loadtest.locustfile as m; print(m.__file__)') \
                 --host http://127.0.0.1:8000 --web-host 127.0.0.1
Headless: locust -f <same path> --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000 \
                 --csv out/run --max-tokens 64 --prompt-words 64 --api chat
Several processes: add --processes 4 --master-bind-host 127.0.0.1 (locust forks 4 workers), or
run `--master --expect-workers N` here and `locust -f <same path> --worker --master-host HOST` elsewhere.

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

Distributed (locust's own master/worker mode, --master / --worker / --expect-workers): locust's
master aggregates its own statistics; the per-request records, the --max-requests budget and the
user indices (prompt seeds) are kept by the master too, through custom messages (see "Distributed
mode" below), so a distributed run writes the same --records-csv as a single process.
"""
from __future__ import annotations

import csv
import itertools
import logging
import os

import gevent
import requests
from gevent.event import AsyncResult, Event
from locust import User, events, task
from locust.runners import STATE_MISSING, MasterRunner, WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC

from duoserve.errors import DuoserveError
from duoserve.loadtest import client
from duoserve.loadtest.metrics import RECORD_FIELDS
from duoserve.loadtest.prompts import PromptSampler

log = logging.getLogger("duoserve.loadtest")

# Per-process run state, rebuilt at every test start (the web UI can start several tests).
_state: dict = {}

# Seconds a worker waits for the master's answer (a user index, a request permit) before it
# gives up; on loopback an answer takes about a millisecond.
ASK_TIMEOUT_S = 30.0
# Seconds the master waits, beyond --stop-timeout, for its workers to finish their last requests.
DRAIN_SLACK_S = 10.0


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
        if _is_worker(environment):
            # A worker does not quit on its own (the master would just carry on without it): it
            # tells the master, which stops the whole run with exit code 2.
            environment.runner.send_message("duoserve_error", {"reason": str(e)})
        else:
            _finish(environment, "bad configuration", exit_code=2)
        return
    _state.update(api_key=api_key, docs=sampler.docs, model=model, user_index=itertools.count(),
                  max_requests=opts.max_requests, issued=0, completed=0, records=None, writer=None, closed=False)
    if opts.records_csv and not _is_worker(environment):  # the master writes every worker's rows
        path = opts.records_csv
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        fields = RECORD_FIELDS
        if not new:  # appending: keep the columns of the file's header (an older one may lack "worker")
            with open(path, newline="", encoding="utf-8") as f:
                fields = next(csv.reader(f), None) or RECORD_FIELDS
        f = open(path, "a", newline="", encoding="utf-8")  # closed at test stop
        _state["records"] = f
        _state["writer"] = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
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
        _state["closed"] = True


@events.test_stop.add_listener
def _on_test_stop(environment, **_kw):
    if isinstance(environment.runner, MasterRunner):
        _drain_workers(environment)
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
        worker = _is_worker(self.environment)
        self.index = _ask(self.environment, "user_index") if worker else next(_state["user_index"])
        if self.index is None:  # the master did not answer or refused: this user sends nothing
            raise gevent.GreenletExit()
        self.session = requests.Session()
        # Per-user stream of prompts: reproducible for a given (seed, user index).
        self.sampler = PromptSampler(_state["docs"], opts.prompt_words, seed=f"{opts.seed}-{self.index}")

    def on_stop(self):
        if getattr(self, "session", None) is not None:
            self.session.close()

    @task
    def generate(self):
        opts = self.environment.parsed_options
        if opts.max_requests:
            if _is_worker(self.environment):
                if not _ask(self.environment, "permit"):  # the master holds the budget of all workers
                    raise gevent.GreenletExit()
            elif not _take_permit():
                raise gevent.GreenletExit()  # this user is done; the last request to finish ends the run
        stream = not opts.no_stream
        body = client.build_payload(opts.api, _state["model"], self.sampler.sample(), opts.max_tokens,
                                    stream=stream, fixed_length=not opts.natural_length,
                                    temperature=opts.temperature)
        rec = client.send(self.session, self.environment.host, opts.api, body, _state["api_key"],
                          opts.request_timeout)
        self.last_failed = not rec.ok
        rec.users = self.environment.runner.user_count if self.environment.runner else 0
        self._report(rec, name=f"{opts.api}{' stream' if stream else ''}")
        if _is_worker(self.environment):
            # Counted by the master when the record arrives (it also ends the run at --max-requests).
            self.environment.runner.send_message("duoserve_record",
                                                 {**rec.row(), "worker": self.environment.runner.worker_index})
        else:
            _record_row(self.environment, rec.row())

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


def _take_permit() -> bool:
    """One request of the --max-requests budget (single process, or the master for its workers)."""
    if not _state:
        return False
    limit = _state_max_requests()
    if limit and _state["issued"] >= limit:
        return False
    _state["issued"] += 1
    return True


def _state_max_requests() -> int:
    return _state.get("max_requests", 0)


def _record_row(environment, row: dict) -> None:
    """Write one request's row (local user, or a worker's row on the master) and count it."""
    if not _state:
        return
    if _state.get("records") is not None:  # None once the test stopped (file closed)
        _state["writer"].writerow(row)
        _state["records"].flush()  # a run killed from outside keeps what it measured
    elif _state.get("closed"):
        log.warning("a request finished after the test stopped; not in the records CSV")
    _state["completed"] += 1
    limit = _state_max_requests()
    if limit and _state["completed"] == limit:
        _finish(environment, f"--max-requests {limit} reached")


# ---------------------------------------------------------------------------------------------
# Distributed mode. Locust ships its own statistics from workers to the master, but not
# duoserve's per-request records (the exact TTFT/TPOT/ITL/E2E rows the reports are computed
# from), nor a run-wide request budget or user numbering. These travel as custom messages over
# locust's existing master-worker connection rather than as per-worker files merged afterwards:
# workers may run on other machines without a shared filesystem, the master stays the only
# writer of --records-csv (no interleaved appends from several processes), and --max-requests
# stays exact because the master hands out every request permit (one round trip per request,
# about a millisecond on loopback, outside the measured time).
#   worker -> master  duoserve_ask {id, kind: user_index|permit}   master -> worker  duoserve_answer {id, value}
#   worker -> master  duoserve_record <row>                        (one per finished request)
#   worker -> master  duoserve_error {reason}                      (bad configuration on that worker: exit 2)
#   master -> worker  duoserve_drain; worker -> master duoserve_drained  (at test stop, see _drain_workers)
# ---------------------------------------------------------------------------------------------
_pending: dict[int, AsyncResult] = {}  # worker: questions to the master awaiting an answer
_ask_ids = itertools.count()
_drain: dict = {}  # master: {"waiting": set of worker ids, "done": Event}


def _is_worker(environment) -> bool:
    return isinstance(environment.runner, WorkerRunner)


def _ask(environment, kind: str):
    """Ask the master for a user index or a request permit; None when it does not answer."""
    rid = next(_ask_ids)
    result = _pending[rid] = AsyncResult()
    try:
        environment.runner.send_message("duoserve_ask", {"id": rid, "kind": kind})
        return result.get(timeout=ASK_TIMEOUT_S)
    except gevent.Timeout:
        log.error("no answer from the master within %gs (%s)", ASK_TIMEOUT_S, kind)
        return None
    finally:
        _pending.pop(rid, None)


def _on_ask(environment, msg, **_kw):  # master
    kind = msg.data["kind"]
    if not _state:
        value = None  # the master refused the configuration; it is stopping
    elif kind == "user_index":
        value = next(_state["user_index"])  # run-wide numbering: user i draws from "<seed>-<i>"
    else:
        value = _take_permit()
    environment.runner.send_message("duoserve_answer", {"id": msg.data["id"], "value": value},
                                    client_id=msg.node_id)


def _on_answer(environment, msg, **_kw):  # worker
    result = _pending.get(msg.data["id"])
    if result is not None:
        result.set(msg.data["value"])


def _on_record(environment, msg, **_kw):  # master
    row = dict(msg.data)
    # The concurrency of the whole run, not of the one worker that sent the request.
    row["users"] = environment.runner.user_count or row.get("users", 0)
    _record_row(environment, row)


def _on_worker_error(environment, msg, **_kw):  # master
    log.error("worker %s cannot start the load test: %s", msg.node_id, msg.data["reason"])
    _finish(environment, "bad configuration on a worker", exit_code=2)


def _on_drain(environment, msg, **_kw):  # worker, run in its own greenlet
    # Stop the users gracefully: requests in flight finish (bounded by --stop-timeout, which the
    # master sent with the spawn message) and their records go out before "drained" (messages on
    # one connection arrive in order). Locust's statistics are pushed too, so that the master's
    # --csv holds them (its CSV writer is not rerun after the master quits).
    environment.runner.stop()
    send_stats = getattr(environment.runner, "_send_stats", None)  # private in locust 2.x
    if send_stats is not None:
        send_stats()
    environment.runner.send_message("duoserve_drained", None)


def _on_drained(environment, msg, **_kw):  # master
    waiting = _drain.get("waiting")
    if waiting is not None:
        waiting.discard(msg.node_id)
        if not waiting:
            _drain["done"].set()


def _drain_workers(environment) -> None:
    """At test stop on the master: wait until every worker has finished its last requests.

    Locust's headless master quits its workers and exits half a second later, which would drop
    the requests still in flight at the time limit (and their records); a single process lets
    them finish within --stop-timeout. This keeps the two the same.
    """
    runner = environment.runner
    workers = [c.id for c in runner.clients.all if c.state != STATE_MISSING]
    if not workers:
        return
    _drain.update(waiting=set(workers), done=Event())
    for cid in workers:
        runner.send_message("duoserve_drain", None, client_id=cid)
    limit = (environment.stop_timeout or 0.0) + DRAIN_SLACK_S
    if not _drain["done"].wait(timeout=limit):
        log.warning("%d worker(s) did not finish within %gs: %s", len(_drain["waiting"]), limit,
                    ", ".join(sorted(_drain["waiting"])))
    _drain.clear()


@events.init.add_listener
def _on_init(environment, **_kw):
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        runner.register_message("duoserve_ask", _on_ask)
        runner.register_message("duoserve_record", _on_record)
        runner.register_message("duoserve_error", _on_worker_error)
        runner.register_message("duoserve_drained", _on_drained)
    elif isinstance(runner, WorkerRunner):
        runner.register_message("duoserve_answer", _on_answer)
        runner.register_message("duoserve_drain", _on_drain, concurrent=True)
