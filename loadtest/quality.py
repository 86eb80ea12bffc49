"""Quality through the endpoint: perplexity from prompt logprobs, and greedy-output agreement.

Perplexity: each held-out window is sent to /v1/completions with echo=true, logprobs=0 and
max_tokens=0, so the server scores the prompt and generates nothing; the log-probabilities of
all tokens but the first (which has no context) are summed over windows:
    ppl = exp(-sum(logprob) / n_scored_tokens).
Windows restart the context (no striding), so the value is comparable between two servers of
the same model and tokenizer, not to published full-context perplexities.

Agreement: the same prompts are completed greedily (temperature 0, the model may stop at EOS) by
both servers; tokens come back as `logprobs.tokens`. Reported: the fraction of prompts with
identical outputs, the position-wise token agreement, and the mean common-prefix length.
"""
from __future__ import annotations

import logging
import math

import requests

from duoserve.loadtest.client import EndpointError, post_json
from duoserve.loadtest.prompts import PromptSampler

log = logging.getLogger(__name__)


def held_out_windows(source: str, words: int, n: int, seed: int) -> list[str]:
    return PromptSampler.from_source(source, words, seed=f"quality-{seed}").take(n)


def _score(session, url, model, api_key, text, timeout_s) -> tuple[float, int]:
    """(sum of logprobs, number of scored tokens) of one window."""
    body = {"model": model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0.0}
    generated = 0
    try:
        data = post_json(session, url, "/v1/completions", body, api_key, timeout_s)
    except EndpointError as e:
        if e.status != 400:
            raise
        # Servers that refuse max_tokens=0: generate one token and drop it from the echo.
        body["max_tokens"] = 1
        data = post_json(session, url, "/v1/completions", body, api_key, timeout_s)
        generated = int((data.get("usage") or {}).get("completion_tokens") or 1)
    logprobs = (data["choices"][0].get("logprobs") or {}).get("token_logprobs")
    if not logprobs:
        raise EndpointError(f"{url} returned no prompt logprobs for echo=true; it cannot score text")
    if generated:
        logprobs = logprobs[:-generated]
    scored = [lp for lp in logprobs if lp is not None]
    return sum(scored), len(scored)


def perplexity(url: str, model: str, api_key: str | None, windows: list[str], timeout_s: float = 300.0) -> dict:
    total, count = 0.0, 0
    with requests.Session() as session:
        for i, text in enumerate(windows):
            s, n = _score(session, url, model, api_key, text, timeout_s)
            if not math.isfinite(s):
                raise EndpointError(f"{url} returned a non-finite logprob for window {i}")
            total, count = total + s, count + n
    if count == 0:
        raise EndpointError(f"{url} scored no tokens")
    return {"ppl": math.exp(-total / count), "nll_sum": -total, "tokens": count, "windows": len(windows)}


def greedy_outputs(url: str, model: str, api_key: str | None, prompts: list[str], max_tokens: int,
                   timeout_s: float = 300.0) -> list[dict]:
    out = []
    with requests.Session() as session:
        for p in prompts:
            body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 0}
            choice = post_json(session, url, "/v1/completions", body, api_key, timeout_s)["choices"][0]
            tokens = (choice.get("logprobs") or {}).get("tokens")
            if tokens is None:
                raise EndpointError(f"{url} returned no logprobs.tokens; cannot compare outputs token by token")
            out.append({"prompt": p, "text": choice.get("text", ""), "tokens": tokens})
    return out


def agreement(a: list[dict], b: list[dict]) -> dict:
    """Compare two servers' greedy outputs for the same prompts (a is the reference)."""
    if len(a) != len(b) or any(x["prompt"] != y["prompt"] for x, y in zip(a, b)):
        raise ValueError("greedy outputs were made from different prompts; rerun both with the same seed")
    exact, same_pos, positions, prefixes = 0, 0, 0, []
    for x, y in zip(a, b):
        ta, tb = x["tokens"], y["tokens"]
        exact += ta == tb
        positions += max(len(ta), len(tb))
        same_pos += sum(u == v for u, v in zip(ta, tb))
        k = 0
        while k < min(len(ta), len(tb)) and ta[k] == tb[k]:
            k += 1
        prefixes.append(k)
    n = len(a)
    return {"prompts": n, "exact_match": exact / n if n else math.nan,
            "token_agreement": same_pos / positions if positions else math.nan,
            "mean_common_prefix": sum(prefixes) / n if n else math.nan,
            "mean_reference_tokens": sum(len(x["tokens"]) for x in a) / n if n else math.nan}
