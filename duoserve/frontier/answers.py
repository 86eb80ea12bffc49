"""Greedy chat answers to a few fixed prompts: what the operating-point rule reads.

Through a served endpoint (`endpoint_answers`, the chat API as the quickstart asks it) when speed
is measured, else in-process (`python -m duoserve.frontier.answers MODEL ...`, run in a subprocess
by `duoserve frontier --no-speed`: the model's chat template, greedy decoding, the same
activation-sparsity thresholds as `duoserve eval`). No minimum length: an answer that ends at once
must show up as empty.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from duoserve.quickstart import DEFAULT_PROMPT

# The fixed prompts: the quickstart's, then three everyday requests of different shapes (a fact,
# a list, a short story), so one lucky answer does not pass a broken model.
FIXED_PROMPTS = (
    DEFAULT_PROMPT,
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for staying healthy.",
    "Write a four-sentence story about a cat who learns to swim.",
)


def endpoint_answers(url: str, api_key: str | None, model: str, prompts=FIXED_PROMPTS, max_tokens: int = 64,
                     timeout_s: float = 300.0) -> list[str]:
    """One greedy (temperature 0) chat completion per prompt from an OpenAI-compatible server."""
    import requests

    from duoserve.loadtest.client import post_json

    out = []
    with requests.Session() as s:
        for p in prompts:
            body = {"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": max_tokens,
                    "temperature": 0.0}
            data = post_json(s, url, "/v1/chat/completions", body, api_key, timeout_s)
            out.append(data["choices"][0]["message"].get("content") or "")
    return out


def in_process_answers(model: str | None, activation_sparsity: float | None, prompts=FIXED_PROMPTS,
                       max_tokens: int = 64, dtype: str = "bfloat16") -> list[str]:
    import torch

    from duoserve.prune.pruned_models import load_any_model

    torch.manual_seed(0)
    lm, tokenizer, _ = load_any_model(model, None, dtype, activation_sparsity)
    lm.eval()
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            gen = lm.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m duoserve.frontier.answers", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="checkpoint or dense model (default: the built-in one)")
    p.add_argument("--activation-sparsity", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    answers = in_process_answers(args.model, args.activation_sparsity, max_tokens=args.max_tokens, dtype=args.dtype)
    args.json.write_text(json.dumps({"prompts": list(FIXED_PROMPTS), "answers": answers}, indent=2) + "\n")
    for q, a in zip(FIXED_PROMPTS, answers):
        print(f"> {q}\n{a}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
