"""One timed request to an OpenAI-compatible endpoint (chat or completions, streamed or not).

Plain `requests`, so the same code runs inside locust (which monkeypatches sockets for gevent)
and in the benchmark driver. Every request is bounded: a connect timeout, a read timeout
between bytes, and a total deadline checked while the stream arrives, so a stalled or overloaded
server shows up as a failure with a readable reason instead of a hang.
"""
from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import requests

from duoserve.loadtest.metrics import RequestRecord

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
CONNECT_TIMEOUT_S = 10.0


class EndpointError(RuntimeError):
    """A request the endpoint refused or could not answer; the message says why."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def base_url(url: str) -> str:
    """'http://host:port' from 'http://host:port', '.../', or '.../v1' (what users paste)."""
    u = url.strip().rstrip("/")
    if u.endswith("/v1"):
        u = u[: -len("/v1")]
    parts = urlsplit(u)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return u


def headers(api_key: str | None) -> dict:
    h = {"Content-Type": "application/json"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    return h


def build_payload(api: str, model: str, prompt: str, max_tokens: int, *, stream: bool, fixed_length: bool = True,
                  temperature: float = 0.0, extra: dict | None = None) -> dict:
    """The JSON body. fixed_length sends vLLM's ignore_eos and min_tokens so every request
    produces exactly max_tokens tokens (servers without these extensions may reject them)."""
    if api not in PATHS:
        raise ValueError(f"api must be one of {sorted(PATHS)}, got {api!r}")
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if fixed_length:
        body["ignore_eos"] = True
        body["min_tokens"] = max_tokens
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}  # token counts arrive in the last event
    if extra:
        body.update(extra)
    return body


def error_message(resp: requests.Response) -> str:
    """'HTTP 503: <server message>' from an OpenAI-style (or any) error body."""
    text = resp.text[:500]
    try:
        err = resp.json().get("error", text)
        text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        pass
    return f"HTTP {resp.status_code}: {text.strip()}"


def _delta_text(api: str, event: dict) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if api == "chat":
        delta = c.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return c.get("text") or ""


def send(session: requests.Session, url: str, api: str, body: dict, api_key: str | None,
         timeout_s: float) -> RequestRecord:
    """Send one request and time it. Never raises for endpoint trouble: the record says ok=False."""
    stream = bool(body.get("stream"))
    rec = RequestRecord(start=time.time(), api=api, stream=stream)
    t0 = time.perf_counter()
    resp = None
    try:
        resp = session.post(base_url(url) + PATHS[api], json=body, headers=headers(api_key), stream=stream,
                            timeout=(CONNECT_TIMEOUT_S, timeout_s))
        rec.status = resp.status_code
        if resp.status_code != 200:
            rec.error = error_message(resp)
        elif stream:
            _read_stream(resp, api, rec, t0, timeout_s)
        else:
            data = resp.json()
            rec.e2e_s = time.perf_counter() - t0
            usage = data.get("usage") or {}
            rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            rec.output_tokens = int(usage.get("completion_tokens") or 0)
    except requests.Timeout:
        rec.error = f"timeout: no answer within {timeout_s:g} s"
    except requests.ConnectionError as e:
        # A read timeout inside a stream surfaces as ConnectionError(ReadTimeoutError).
        if "timed out" in str(e):
            rec.error = f"timeout: no data for {timeout_s:g} s"
        elif "without response" in str(e):  # http.client's RemoteDisconnected: the request was not answered
            rec.error = f"connection closed by the server without a response: {str(e)[:150]}"
        else:
            rec.error = f"connection error: {str(e)[:200]}"
    except requests.exceptions.ChunkedEncodingError as e:
        rec.error = f"stream error: connection closed mid-response ({str(e)[:150]})"
    except requests.RequestException as e:
        rec.error = f"request error: {str(e)[:200]}"
    except (ValueError, KeyError, TypeError) as e:  # malformed JSON / SSE from the server
        rec.error = f"bad response: {e}"
    finally:
        if resp is not None:
            resp.close()  # on an unfinished stream this drops the connection: the server aborts
    if not rec.e2e_s:
        rec.e2e_s = time.perf_counter() - t0
    if not rec.error and rec.output_tokens <= 0:
        rec.error = "bad response: no output tokens"
    rec.ok = not rec.error
    return rec


def _read_stream(resp: requests.Response, api: str, rec: RequestRecord, t0: float, timeout_s: float) -> None:
    """Parse server-sent events as they arrive; fill TTFT, ITL, E2E and token counts."""
    buf = b""
    last_token_t = None
    events_with_text = 0
    done = False
    # chunk_size=None yields each transfer chunk as soon as it arrives (no re-buffering).
    for chunk in resp.iter_content(chunk_size=None):
        now = time.perf_counter()
        if now - t0 > timeout_s:
            rec.error = f"timeout: stream still running after {timeout_s:g} s"
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, "event:" lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            event = json.loads(payload)
            if "error" in event:  # an error raised after the 200 header went out
                err = event["error"]
                rec.error = "stream error: " + (err.get("message", str(err)) if isinstance(err, dict) else str(err))
                if isinstance(err, dict) and isinstance(err.get("code"), int):
                    rec.status = err["code"]  # e.g. vLLM's admission refusal (503) sent after the 200 header
                return
            if _delta_text(api, event):
                events_with_text += 1
                if last_token_t is None:
                    rec.ttft_s = now - t0
                else:
                    rec.itl_s.append(now - last_token_t)
                last_token_t = now
            usage = event.get("usage")
            if usage:
                rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                rec.output_tokens = int(usage.get("completion_tokens") or 0)
    rec.e2e_s = time.perf_counter() - t0
    if not done:
        rec.error = "stream error: connection closed before [DONE]"
    elif rec.output_tokens == 0:
        rec.output_tokens = events_with_text  # server without usage in streams: one token per event


def post_json(session: requests.Session, url: str, path: str, body: dict, api_key: str | None,
              timeout_s: float) -> dict:
    """A non-streamed JSON request; raises EndpointError with the server's reason on failure."""
    try:
        resp = session.post(base_url(url) + path, json=body, headers=headers(api_key),
                            timeout=(CONNECT_TIMEOUT_S, timeout_s))
    except requests.RequestException as e:
        raise EndpointError(f"{url}{path}: {e}") from e
    if resp.status_code != 200:
        raise EndpointError(f"{url}{path}: {error_message(resp)}", resp.status_code)
    return resp.json()


def get_json(session: requests.Session, url: str, path: str, api_key: str | None, timeout_s: float = 10.0) -> dict:
    try:
        resp = session.get(base_url(url) + path, headers=headers(api_key), timeout=(CONNECT_TIMEOUT_S, timeout_s))
    except requests.RequestException as e:
        raise EndpointError(f"{url}{path}: {e}") from e
    if resp.status_code != 200:
        raise EndpointError(f"{url}{path}: {error_message(resp)}", resp.status_code)
    return resp.json()


def served_model(session: requests.Session, url: str, api_key: str | None) -> str:
    """The first model id the endpoint lists (what to put in "model")."""
    data = get_json(session, url, "/v1/models", api_key).get("data") or []
    if not data:
        raise EndpointError(f"{url}/v1/models lists no model")
    return data[0]["id"]
