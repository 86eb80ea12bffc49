"""A scripted OpenAI-compatible endpoint on 127.0.0.1 for fast client tests (no model, no vLLM).

Streams `tokens` events spaced `token_delay_s` apart after `first_delay_s`, so the expected
TTFT/ITL/TPOT are known. `mode` scripts failures: "ok", "busy" (503 with an OpenAI error body),
"stall" (accepts, then sends nothing), "cut" (closes the stream halfway, no [DONE]),
"midstream_error" (an error event after some tokens), "drop" (reads the request, then closes the
connection without a response, as an overloaded uvicorn sometimes does). The real-server checks are in test_live.py.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, tokens: int = 5, first_delay_s: float = 0.05, token_delay_s: float = 0.02,
                 mode: str = "ok", api_key: str | None = None):
        self.tokens, self.first_delay_s, self.token_delay_s = tokens, first_delay_s, token_delay_s
        self.mode, self.api_key = mode, api_key
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _json(self, code: int, obj: dict):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._json(401, {"error": "Unauthorized"})
                    return False
                return True

            def do_GET(self):
                if self.path == "/v1/models" and self._authorized():
                    self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                elif self.path != "/v1/models":
                    self._json(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                fake.requests.append(body)
                if not self._authorized():
                    return
                if fake.mode == "drop":
                    self.close_connection = True
                    return
                if fake.mode == "busy":
                    self._json(503, {"error": {"message": "The engine is currently busy", "code": 503}})
                    return
                chat = self.path.endswith("/chat/completions")
                n = int(body.get("max_tokens", fake.tokens)) if body.get("ignore_eos") else fake.tokens
                if not body.get("stream"):
                    time.sleep(fake.first_delay_s + fake.token_delay_s * (n - 1))
                    text = "x" * n
                    choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                    self._json(200, {"choices": [choice], "usage": {"prompt_tokens": 7, "completion_tokens": n}})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def event(obj):
                    data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()

                if fake.mode == "stall":
                    time.sleep(30)
                    return
                if chat:  # vLLM first sends the role with empty content: not a token
                    event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
                time.sleep(fake.first_delay_s)
                for i in range(n):
                    if i:
                        time.sleep(fake.token_delay_s)
                    if fake.mode == "cut" and i == n // 2:
                        self.close_connection = True
                        return
                    if fake.mode == "midstream_error" and i == n // 2:
                        event({"error": {"message": "engine died", "code": 500}})
                        break
                    event({"choices": [{"delta": {"content": "x"}} if chat else {"text": "x"}]})
                else:
                    event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n}})
                event(b"[DONE]")
                self.wfile.write(b"0\r\n\r\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
