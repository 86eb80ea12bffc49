"""`duoserve quickstart` (README command 1) end to end, on the tiny Llama instead of SmolLM2-135M:
DuoGPT prune -> vLLM serving the dense model, then the checkpoint with the plugin -> one chat
request to each through the openai client -> both answers side by side with each one's TTFT and
tokens/s. The built-in model takes minutes to prune on this CPU; every step after the model choice
is the same code."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from process_helpers import duoserve_cli

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]


def test_quickstart_prunes_serves_and_reports_decode_speed(tiny_llama_dir, tmp_path):
    ckpt = tmp_path / "quickstart-ckpt"
    args = ["quickstart", "--model", str(tiny_llama_dir), "--nsamples", "4", "--seqlen", "64", "--output", str(ckpt),
            "--max-tokens", "24", "--min-tokens", "12"]
    with duoserve_cli(args) as (proc, out):
        out.wait_for("vLLM pid", 300)
        report = out.wait_for("tokens/s decode", 600)
        assert proc.wait(timeout=120) == 0, "".join(out.lines[-40:])
    text = "".join(out.lines)
    # The defaults: the operating point `duoserve frontier` chose (W0.4 pruned for X0.4, served at X0).
    assert "[1/3] pruning" in text and "with duogpt: W0.4, calibrated for X0.4" in text
    assert "at activation sparsity 0 (" in text
    assert (ckpt / "config.json").is_file()  # the checkpoint is where --output said
    tokens, decode = re.search(r"(\d+) tokens in [\d.]+ s: .* ([\d.]+|nan) tokens/s decode", report).groups()
    assert 12 <= int(tokens) <= 24, report  # --min-tokens held the answer to 12 tokens at least
    assert decode != "nan", report
    # The dense model answered the same prompt in the same run, shown next to the sparse answer.
    assert "answered by both" in text and re.search(r"^dense +\| sparse \(W0\.4 \+ X0\)$", text, re.M), text
    dense = re.search(r"^dense : (\d+) tokens in [\d.]+ s: .* ([\d.]+) tokens/s decode, time to first token "
                      r"(\d+) ms$", text, re.M)
    assert dense and 12 <= int(dense.group(1)) <= 24, text
    assert re.search(r"sparse / dense: decode [\d.]+x, time to first token [\d.]+x", text), text


def test_quickstart_refuses_min_tokens_above_max_tokens(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "duoserve.cli", "quickstart", "--output", str(tmp_path / "c"),
                           "--max-tokens", "8", "--min-tokens", "9"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--min-tokens between 0 and --max-tokens" in proc.stderr
    assert not (tmp_path / "c").exists()  # refused before pruning anything


@pytest.mark.parametrize("flag", ["--activation-sparsity", "--serve-activation-sparsity"])
def test_quickstart_refuses_activation_sparsity_outside_0_1(tmp_path, flag):
    proc = subprocess.run([sys.executable, "-m", "duoserve.cli", "quickstart", "--output", str(tmp_path / "c"),
                           flag, "1.0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{flag} must be in [0, 1)" in proc.stderr
    assert not (tmp_path / "c").exists()  # refused before pruning anything
