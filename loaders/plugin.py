"""The `vllm.general_plugins` entry point (pyproject.toml): registers quantization method `duoserve`.

vLLM calls every general plugin once in each of its processes (API server, engine core, workers),
so `register` must be cheap and idempotent. It is also where each of those processes asks Linux
for AMX tile state on CPUs that have it: vLLM's CPU attention runs AMX instructions without asking,
which kills a worker whose linears are all duoserve's (nothing else asked first; see
duoserve/kernels/cpu_features.py).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
_done = False


def route_logs() -> None:
    """vLLM configures only the `vllm` logger; give ours a handler so load-time lines reach the log."""
    root = logging.getLogger("duoserve")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [duoserve] %(message)s", "%m-%d %H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def enable_amx_tile_state() -> None:
    """Request AMX tile state for this process where the CPU has AMX; say so when it is refused."""
    from duoserve.kernels.cpu_features import cpu_has_amx, request_amx_tile_state

    outcome = request_amx_tile_state()
    if outcome.granted:
        log.debug("AMX tile state: %s", outcome.reason)
    elif cpu_has_amx():
        log.warning("AMX tile state not available to this process (%s): vLLM's CPU attention may die of "
                    "SIGILL on its first request; see docs/environment.md, 'AMX hosts'", outcome.reason)


def register() -> None:
    global _done
    if _done:
        return
    from duoserve.loaders import vllm_compat

    route_logs()
    enable_amx_tile_state()
    vllm_compat.check_version()
    if not vllm_compat.is_registered("duoserve"):
        from duoserve.loaders.config import DuoserveConfig

        vllm_compat.register_quantization_config("duoserve")(DuoserveConfig)
        log.debug("registered vLLM quantization method 'duoserve'")
    _done = True
