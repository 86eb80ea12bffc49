"""The `vllm.general_plugins` entry point (pyproject.toml): registers quantization method `duoserve`.

vLLM calls every general plugin once in each of its processes (API server, engine core, workers),
so `register` must be cheap and idempotent.
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


def register() -> None:
    global _done
    if _done:
        return
    from duoserve.loaders import vllm_compat

    route_logs()
    vllm_compat.check_version()
    if not vllm_compat.is_registered("duoserve"):
        from duoserve.loaders.config import DuoserveConfig

        vllm_compat.register_quantization_config("duoserve")(DuoserveConfig)
        log.debug("registered vLLM quantization method 'duoserve'")
    _done = True
