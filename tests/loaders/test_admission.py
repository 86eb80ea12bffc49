"""duoserve's default overload policy: the bounded request queue set on vLLM's engine config.

Unit level: the limit follows max_num_seqs and the data-parallel size, never overrides a limit the
user gave, and the hook wraps vLLM's EngineArgs.create_engine_config once. The live check that a
client over the limit gets a 503 is in test_serve_cli_endpoints.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from duoserve.loaders import admission

pytestmark = pytest.mark.timeout(120)


def _config(max_num_seqs=4, queued=None, dp=1):
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_queued_reqs=queued),
                           parallel_config=SimpleNamespace(data_parallel_size=dp))


def test_limit_is_in_flight_per_seq_times_batch_times_ranks():
    cfg = _config(max_num_seqs=128)
    assert admission.bound_queue(cfg, 2) == 256 and cfg.scheduler_config.max_num_queued_reqs == 256
    cfg = _config(max_num_seqs=4, dp=3)
    assert admission.bound_queue(cfg, 2) == 24


def test_a_limit_the_user_gave_is_kept_and_zero_means_unbounded():
    cfg = _config(max_num_seqs=4, queued=5)
    assert admission.bound_queue(cfg, 2) == 5 and cfg.scheduler_config.max_num_queued_reqs == 5
    cfg = _config(max_num_seqs=4)
    assert admission.bound_queue(cfg, 0) is None and cfg.scheduler_config.max_num_queued_reqs is None


def test_hook_wraps_vllm_engine_config_once(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    built = []
    monkeypatch.setattr(EngineArgs, "create_engine_config", lambda self, **kw: built.append(kw) or _config(8))
    monkeypatch.setenv(admission.ENV, "3")
    admission.install_from_env()
    admission.install_from_env()  # idempotent: vLLM may import us twice
    cfg = EngineArgs.create_engine_config(None, usage_context="x")
    assert built == [{"usage_context": "x"}]  # vLLM's own builder ran once, with the caller's arguments
    assert cfg.scheduler_config.max_num_queued_reqs == 24


@pytest.mark.parametrize("value", ["", "0"])
def test_hook_is_off_without_the_launcher_asking(monkeypatch, value):
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    monkeypatch.setenv(admission.ENV, value)
    admission.install_from_env()
    assert EngineArgs.create_engine_config is original


def test_bad_environment_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(admission.ENV, "lots")
    with pytest.raises(SystemExit, match="not an integer"):
        admission.install_from_env()


def test_serve_cli_has_an_opt_out():
    import argparse

    from duoserve.loaders import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    ours, rest = cli._split(parser.parse_args(["CKPT", "--no-queue-limit", "--max-num-seqs", "4"]))
    assert ours.no_queue_limit and rest == ["--max-num-seqs", "4"]


def test_n_over_the_limit_is_a_client_error_and_n_within_it_goes_to_vllm(monkeypatch):
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.async_llm import AsyncLLM

    seen = []
    monkeypatch.setattr(AsyncLLM, "check_admission", lambda self, n=1, request_id=None: seen.append(n))
    admission.refuse_unadmittable_n()
    admission.refuse_unadmittable_n()  # idempotent
    engine = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_queued_reqs=8))
    AsyncLLM.check_admission(engine, 8)
    with pytest.raises(VLLMValidationError, match=r"n=9 .* at most 8 sequences .* n <= 8") as info:
        AsyncLLM.check_admission(engine, 9)
    assert info.value.parameter == "n"
    unbounded = SimpleNamespace(scheduler_config=SimpleNamespace(max_num_queued_reqs=None))
    AsyncLLM.check_admission(unbounded, 100000)
    assert seen == [8, 100000]  # vLLM's own check ran for what fits (it answers 503 under load)
