"""Run lm-evaluation-harness on a model in this process or on a served OpenAI-compatible endpoint.

In-process: the model comes from `duoserve.prune.pruned_models.load_any_model` (a duoserve checkpoint
with its activation sparsity hooks, or a dense HF model), wrapped in lm-eval's HFLM, which takes
an already-built model object. Endpoint: lm-eval's `local-completions` model sends each
(context, continuation) as token ids to URL/v1/completions with echo=True, logprobs=1,
max_tokens=1 and reads the prompt tokens' log-probabilities back; it needs the served model's
tokenizer to find where the continuation starts (a local folder, or the server's /tokenize).
Both paths use lm-eval's own request building and scoring; nothing here computes an accuracy.
"""
from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from duoserve.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZeroShotConfig:
    """What to evaluate and how; validated on construction."""

    tasks: tuple[str, ...]
    limit: int | None = None        # first N items per task (lm-eval's --limit); None = all
    data: str = "auto"              # auto | offline | hub
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        from duoserve.evaluation.zeroshot.tasks import DATA_SOURCES, TASKS

        if not self.tasks:
            raise InputError("no tasks to evaluate")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise InputError(f"unknown task(s) {unknown}; valid: {', '.join(TASKS)}")
        if self.limit is not None and self.limit <= 0:
            raise InputError(f"--limit must be a positive number of items, not {self.limit}")
        if self.batch_size <= 0:
            raise InputError(f"--batch-size must be positive, not {self.batch_size}")
        if self.data not in DATA_SOURCES:
            raise InputError(f"--data must be one of {', '.join(DATA_SOURCES)}, not {self.data!r}")


# ----------------------------------------------------------------------------- model wrappers

def in_process_lm(model: str | None, *, activation_mode: str | None = None, activation_sparsity: float | None = None,
                  dtype: str = "bfloat16", batch_size: int = 16, max_length: int | None = None):
    """(lm-eval HFLM, description) for a checkpoint or dense model, activation sparsity as in eval ppl."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from duoserve.prune.pruned_models import load_any_model

    if activation_sparsity is not None and not 0 <= activation_sparsity < 1:
        raise InputError(f"--activation-sparsity {activation_sparsity} is outside [0, 1)")
    hf_model, tokenizer, ckpt = load_any_model(model, activation_mode, dtype, activation_sparsity)
    sparsity = getattr(hf_model, "duoserve_sparsity", None)
    desc: dict[str, Any] = {
        "kind": "in-process", "model": model or "default", "dtype": dtype,
        "activation_mode": "off" if sparsity is None else sparsity.mode,
    }
    if sparsity is not None and (sparsity.mode == "topk" or activation_sparsity is not None):
        desc["activation_sparsity"] = sparsity.p
    if ckpt is not None:
        desc["checkpoint"] = {"method": ckpt.qconfig.producer.get("method"),
                              "weight_sparsity": ckpt.qconfig.global_sparsity,
                              "activation_sparsity_target": ckpt.qconfig.activation_sparsity.target,
                              "producer": ckpt.qconfig.producer}
    if tokenizer.pad_token is None:  # HFLM pads batches; Llama tokenizers often ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"max_length": max_length} if max_length else {}
    lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size, device="cpu"
              if not torch.cuda.is_available() else "cuda", **kwargs)
    desc["max_length"] = lm.max_length
    return lm, desc


def normalize_endpoint(url: str) -> str:
    """'http://h:p', 'http://h:p/v1' or '.../v1/completions' -> 'http://h:p/v1/completions'."""
    if not url.startswith(("http://", "https://")):
        raise InputError(f"--endpoint must be an http(s) URL such as http://127.0.0.1:8000, not {url!r}")
    base = url.rstrip("/")
    for suffix in ("/v1/completions", "/v1"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base + "/v1/completions"


def query_served_model(completions_url: str, api_key: str | None, timeout: float = 30.0) -> tuple[str, int | None]:
    """(id, max_model_len) of the first model the server lists at /v1/models (vLLM serves one)."""
    models_url = completions_url[: -len("/completions")] + "/models"
    req = urllib.request.Request(models_url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        hint = " (wrong or missing --api-key?)" if e.code in (401, 403) else ""
        raise InputError(f"{models_url} answered HTTP {e.code}{hint}") from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise InputError(f"no OpenAI-compatible server answers at {models_url}: {e}") from e
    models = [m for m in data.get("data", []) if m.get("id")]
    if not models:
        raise InputError(f"{models_url} lists no model")
    if len(models) > 1:
        log.warning("the server lists several models %s; evaluating %s (choose with --served-model)",
                    [m["id"] for m in models], models[0]["id"])
    max_len = models[0].get("max_model_len")  # a vLLM extension of the OpenAI schema
    return models[0]["id"], int(max_len) if isinstance(max_len, int) else None


def endpoint_lm(url: str, *, tokenizer: str | None, served_model: str | None = None, api_key: str | None = None,
                batch_size: int = 16, num_concurrent: int = 1, max_length: int | None = None, timeout: int = 600):
    """(lm-eval LocalCompletionsAPI, description) for a running OpenAI-compatible server.

    max_length None = the server's max_model_len (vLLM lists it), else 2048; lm-eval left-truncates
    longer contexts, as HFLM does in-process at the model's own limit.
    """
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    completions = normalize_endpoint(url)
    listed_name, listed_len = query_served_model(completions, api_key)
    name = served_model or listed_name
    max_length = max_length or listed_len or 2048
    kwargs: dict[str, Any] = {}
    if tokenizer:
        # In-process, HFLM encodes with the tokenizer's defaults (BOS where the tokenizer adds one,
        # as Llama-2/3's do); the API model adds special tokens only if told. Tell it the same, so
        # both paths score identical token sequences.
        kwargs.update(tokenizer_backend="huggingface", tokenizer=tokenizer, add_bos_token=tokenizer_adds_bos(tokenizer))
    else:
        # No local tokenizer: lm-eval uses the server's /tokenizer_info and /tokenize if it has them.
        from lm_eval.utils import check_remote_tokenizer_support

        if not check_remote_tokenizer_support(completions, auth_token=api_key):
            raise InputError(f"the server at {url} does not expose /tokenize; pass the served model's folder "
                             "(MODEL positional argument or --tokenizer) so lm-eval can tokenize locally")
        kwargs.update(tokenizer_backend="remote")
    if api_key:
        kwargs["header"] = {"Authorization": f"Bearer {api_key}"}
    # batch_size prompts go in one request (the completions API takes a list of token-id prompts).
    lm = LocalCompletionsAPI(base_url=completions, model=name, batch_size=batch_size,
                             num_concurrent=num_concurrent, max_length=max_length, timeout=timeout,
                             tokenized_requests=True, max_retries=3, **kwargs)
    return lm, {"kind": "endpoint", "endpoint": completions, "served_model": name,
                "tokenizer": tokenizer or "remote", "max_length": max_length,
                "add_bos_token": kwargs.get("add_bos_token", False)}


def tokenizer_adds_bos(tokenizer: str) -> bool:
    """Whether the tokenizer prepends BOS by default (what HFLM does in-process)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as e:
        raise InputError(f"could not load the tokenizer {tokenizer!r} for the endpoint: {str(e).splitlines()[0]}") from e
    ids = tok("a").input_ids
    return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id


# ----------------------------------------------------------------------------- evaluation

def evaluate(lm, config: ZeroShotConfig, model_desc: dict[str, Any], *, root=None,
             keep_loglikelihoods: bool = False) -> dict[str, Any]:
    """Run lm-eval on `lm` and return the summary (duoserve.evaluation.zeroshot.results.summarize).

    keep_loglikelihoods: also return, per task, each item's log-likelihood of every choice (in
    lm-eval's item order), so two runs of the same items (in-process vs endpoint) can be compared
    request by request, not only by accuracy.
    """
    from lm_eval import simple_evaluate

    from duoserve.evaluation.zeroshot.results import summarize
    from duoserve.evaluation.zeroshot.tasks import build_tasks

    tasks, provenance, tm = build_tasks(list(config.tasks), config.data, root=root)
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=config.limit,
                          log_samples=keep_loglikelihoods,
                          random_seed=config.seed, numpy_random_seed=config.seed,
                          torch_random_seed=config.seed, fewshot_random_seed=config.seed)
    elapsed = time.perf_counter() - start
    if out is None:  # lm-eval returns None only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results")
    setup = {"model": model_desc, "tasks": list(config.tasks), "limit": config.limit,
             "data": sorted({p["source"].split(":")[0] for p in provenance.values()}),
             "num_fewshot": 0, "batch_size": config.batch_size, "seconds": round(elapsed, 1)}
    sparsity = getattr(getattr(lm, "model", None), "duoserve_sparsity", None)
    summary = summarize(out, provenance, setup)
    if sparsity is not None and getattr(sparsity, "record", False):
        realized = sparsity.realized()
        if realized:
            summary["setup"]["activation_sparsity_realized_mean"] = sum(realized.values()) / len(realized)
    if keep_loglikelihoods:
        # each sample's resps: one [(loglikelihood, is_greedy)] per choice
        summary["loglikelihoods"] = {
            name: {str(s["doc_id"]): [float(r[0][0]) for r in s["resps"]] for s in out["samples"][name]}
            for name in config.tasks}
    return summary
