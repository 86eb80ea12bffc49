"""Every kind of checkpoint the suite builds completes a request in vLLM, and the plugin makes the
processes it loads into safe for vLLM's AMX attention.

Kinds: the bitmask and the dense weight format, each with fused thresholds (q/k/v and gate/up
equal: one op call per fused layer) and split ones (one call per shard). Each runs in a fresh
interpreter with vLLM's engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and the fault handler
on, so a kernel fault fails here with the signal and the Python stack of the crash (on an Intel
host with AMX the worker used to die of SIGILL in vLLM's `cpu_attention_with_kv_cache` on the first
request: issue 34), not as an HTTP 500 of a server test far from its cause.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from duoserve.kernels import cpu_features
from serving_helpers import as_dense_format, with_split_thresholds

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

_GENERATE = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], enforce_eager=True, max_model_len=256, dtype="bfloat16", seed=0)
        out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        print("RESULT " + json.dumps({"tokens": list(out[0].outputs[0].token_ids)}))
""")


@pytest.fixture(scope="module")
def checkpoint_kinds(bitmask_ckpt, dense_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    split = with_split_thresholds(bitmask_ckpt, root / "tiny-bitmask-split")
    return {"bitmask": bitmask_ckpt, "dense": dense_ckpt, "bitmask-split-thresholds": split,
            "dense-split-thresholds": as_dense_format(split, root / "tiny-dense-split")}


@pytest.mark.parametrize("kind", ["bitmask", "dense", "bitmask-split-thresholds", "dense-split-thresholds"])
def test_each_checkpoint_kind_completes_a_request(checkpoint_kinds, kind, tmp_path):
    script = tmp_path / "generate.py"
    script.write_text(_GENERATE)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONFAULTHANDLER": "1",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, str(script), str(checkpoint_kinds[kind])], capture_output=True,
                          text=True, env=env, timeout=540)
    tail = (proc.stdout + proc.stderr)[-6000:]
    if proc.returncode < 0:
        pytest.fail(f"{kind}: vLLM died of {signal.Signals(-proc.returncode).name}:\n{tail}")
    assert proc.returncode == 0, f"{kind}: exit code {proc.returncode}:\n{tail}"
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, tail
    assert len(json.loads(result[-1][len("RESULT "):])["tokens"]) == 8


def test_split_thresholds_really_differ(checkpoint_kinds):
    from duoserve.format.io import read_quant_config

    _, fused = read_quant_config(checkpoint_kinds["bitmask"])
    _, split = read_quant_config(checkpoint_kinds["bitmask-split-thresholds"])
    layer = "model.layers.0.self_attn"
    assert fused.modules[f"{layer}.q_proj"].act_threshold == fused.modules[f"{layer}.k_proj"].act_threshold
    assert split.modules[f"{layer}.q_proj"].act_threshold != split.modules[f"{layer}.k_proj"].act_threshold


@pytest.mark.skipif(not cpu_features.cpu_has_amx(), reason="the CPU has no AMX (no amx_tile flag)")
def test_the_plugin_requests_amx_tile_state_in_each_process():
    """The regression test of issue 34 at its cause: after the plugin registers, with no matmul
    run, the process may execute AMX instructions (before the fix nothing had asked)."""
    code = ("import json\n"
            "from duoserve.loaders import plugin\n"
            "plugin.register()\n"
            "from duoserve.kernels import cpu_features as c\n"
            "print(json.dumps(c.amx_tile_permitted()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True
