"""duoserve's overload policy inside the vLLM process: a bounded request queue by default.

vLLM's queue is unbounded unless `--max-num-queued-reqs` is given: under overload every request
waits (TTFT grows without limit) instead of being refused. `duoserve serve` bounds it at
IN_FLIGHT_PER_SEQ x max_num_seqs requests in flight (running + waiting), so a client over capacity
gets HTTP 503 "currently busy" within milliseconds (docs/loadtest.md, "Overload policy").

The limit has to follow the max_num_seqs vLLM resolves for the platform (128 on CPU, 256 to 1024
on GPUs by memory), so it is set on the engine config vLLM has just built, in the API-server
process, and only where the user left `--max-num-queued-reqs` unset. The launcher asks for it
through the environment (ENV); vLLM's own `vllm serve` command never sees this hook.
"""
from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger(__name__)

ENV = "_DUOSERVE_MAX_IN_FLIGHT_PER_SEQ"  # private: set by the launcher only (docs/configuration.md)
IN_FLIGHT_PER_SEQ = 2  # the running batch plus a waiting queue of the same size


def bound_queue(vllm_config, per_seq: int) -> int | None:
    """Set max_num_queued_reqs = per_seq x max_num_seqs x data-parallel size if it is unset.

    Returns the limit now in force (None: unbounded). A limit the user gave is never changed.
    """
    sched = vllm_config.scheduler_config
    if sched.max_num_queued_reqs is not None:
        return sched.max_num_queued_reqs
    if per_seq <= 0:
        return None
    # The limit is checked in the API server over all data-parallel ranks it routes to.
    ranks = getattr(vllm_config.parallel_config, "data_parallel_size", 1) or 1
    sched.max_num_queued_reqs = per_seq * sched.max_num_seqs * ranks
    log.info("duoserve: bounded request queue: max_num_queued_reqs=%d (%d x max_num_seqs %d x %d data-parallel "
             "ranks); over it requests get HTTP 503. Pass --max-num-queued-reqs N or --no-queue-limit to change it.",
             sched.max_num_queued_reqs, per_seq, sched.max_num_seqs, ranks)
    return sched.max_num_queued_reqs


def refuse_unadmittable_n() -> None:
    """In the vLLM API-server process: a request whose `n` alone exceeds the queue limit gets HTTP
    400 naming the limit. vLLM counts each of a request's n sequences as a slot and answers 503
    "currently busy" when they do not fit, which tells a client to retry a request that no server
    of this configuration can ever admit (n=100000 against a limit of 256). 503 stays for requests
    that fit an idle server but not the current load. Idempotent."""
    from duoserve.loaders.vllm_compat import admission_classes

    engine, validation_error = admission_classes()
    check = engine.check_admission
    if getattr(check, "_duoserve_refuses_n", False):
        return

    @functools.wraps(check)
    def check_admission(self, n: int = 1, request_id: str | None = None) -> None:
        limit = self.scheduler_config.max_num_queued_reqs
        if limit is not None and n > limit:
            raise validation_error(
                f"n={n} asks for {n} sequences at once, but this server admits at most {limit} sequences in "
                f"flight (max_num_queued_reqs); ask for n <= {limit}", parameter="n", value=n)
        return check(self, n, request_id)

    check_admission._duoserve_refuses_n = True
    engine.check_admission = check_admission


def install_from_env() -> None:
    """In the vLLM CLI process: refuse requests whose n can never be admitted (always), and bound the
    queue of every engine config built if ENV asks for it."""
    refuse_unadmittable_n()
    raw = os.environ.get(ENV, "")
    if not raw:
        return
    try:
        per_seq = int(raw)
    except ValueError:
        raise SystemExit(f"{ENV}={raw!r} is not an integer (requests in flight per batch slot; 0 = unbounded)")
    if per_seq <= 0:
        return
    from vllm.engine.arg_utils import EngineArgs

    from duoserve.loaders.plugin import route_logs

    route_logs()

    build = EngineArgs.create_engine_config
    if getattr(build, "_duoserve_bounded", False):
        return

    @functools.wraps(build)
    def create_engine_config(self, *args, **kwargs):
        config = build(self, *args, **kwargs)
        bound_queue(config, per_seq)
        return config

    create_engine_config._duoserve_bounded = True
    EngineArgs.create_engine_config = create_engine_config
