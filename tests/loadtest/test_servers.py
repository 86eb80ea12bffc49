"""Starting a model folder for a benchmark: loadtest runs the `duoserve serve` command in a process
of its own and talks to it over HTTP (no import of duoserve's serving side). A stand-in command
checks the arguments, the API key hand-over, readiness, stopping and the refusal of bad input."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest

from duoserve.errors import InputError
from duoserve.loadtest import servers

FAKE_SERVE = textwrap.dedent('''
    import json, os, signal, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    argv = sys.argv[1:]
    opt = lambda name: argv[argv.index(name) + 1]
    with open(opt("--log-file"), "a") as f:
        f.write(json.dumps(argv) + "\\n")
    if os.environ.get("FAKE_SERVE_REFUSE"):
        print("error: checkpoint.safetensors: tensor x has the wrong shape", file=sys.stderr)
        sys.exit(2)
    key = os.environ["DUOSERVE_API_KEY"]
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            ok = self.headers.get("Authorization") == "Bearer " + key
            body = json.dumps({"data": [{"id": opt("--served-model-name")}]} if ok else {}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    HTTPServer(("127.0.0.1", int(opt("--port"))), H).serve_forever()
''')


@pytest.fixture
def folder(tmp_path, monkeypatch):
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVE)
    monkeypatch.setattr(servers, "SERVE_COMMAND", [sys.executable, str(script)])
    model = tmp_path / "smol-duo"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return model


def test_a_folder_is_served_by_the_serve_command_and_stopped(folder, tmp_path):
    start = servers.StartOptions(max_model_len=512, enforce_eager=True, ready_timeout_s=30,
                                 extra_vllm_args=["--max-num-seqs=4"], log_dir=tmp_path / "raw")
    with servers.open_target("sparse", str(folder), None, start=start) as target:
        assert target.model == "sparse-smol-duo" and target.url.startswith("http://127.0.0.1:")
        assert len(target.api_key) == 48  # generated, handed over in the environment
        proc = target.handle.proc
        assert proc.poll() is None
    assert proc.poll() is not None and target.handle is None
    argv = json.loads((tmp_path / "raw" / "sparse_vllm.log").read_text().splitlines()[0])
    assert argv[0] == str(folder) and target.api_key not in argv
    assert argv[argv.index("--max-model-len") + 1] == "512" and "--enforce-eager" in argv
    assert argv[-1] == "--max-num-seqs=4"


def test_a_refused_folder_is_an_input_error_with_the_log_tail(folder, monkeypatch):
    monkeypatch.setenv("FAKE_SERVE_REFUSE", "1")
    with pytest.raises(InputError, match="(?s)exited with code 2.*wrong shape"):
        servers.open_target("dense", str(folder), None, start=servers.StartOptions(ready_timeout_s=30))
