#!/usr/bin/env python
"""Does the server compute what in-process evaluation computes? Token NLL of the same windows.

Serves CKPT with `duoserve serve` machinery (vLLM + the duoserve plugin), asks for the prompt
log-probabilities of N windows of held-out text (completions API, token ids, echo), and compares
them with `duoserve.prune.pruned_models.load_pruned_model` in the given activation mode and dtype:
mean NLL per token on both sides, the mean absolute per-token difference, and how many tokens
differ by more than 0.1 nats.

The same comparison is made between two in-process runs whose embeddings differ by a relative
perturbation of --perturb (default: 1e-7 in float32; 2^-8, one rounding step, in bfloat16): hard
activation thresholds make the model discontinuous, so any change in floating-point summation
order flips inputs near a threshold and the per-token NLL moves (docs/serving.md, "Exactness").
The served model is correct when its per-token difference is no larger than this in-process
sensitivity and the mean NLL agrees; with activation sparsity off both must be ~0.

    python scripts/served_vs_inprocess.py CKPT --windows 4 --seqlen 256 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--data", default="wiki")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--activation-mode", default="threshold", choices=["threshold", "topk", "off"])
    p.add_argument("--perturb", type=float, default=None,
                   help="relative noise on the embeddings for the in-process sensitivity baseline "
                        "(default: 1e-7 for float32, 2^-8 for bfloat16)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.perturb is None:
        args.perturb = 1e-7 if args.dtype == "float32" else 2.0 ** -8

    from openai import OpenAI

    from duoserve.loaders.server import launch
    from duoserve.evaluation.texts import evaluation_tokens
    from duoserve.prune.pruned_models import load_pruned_model
    from duoserve.evaluation.perplexity import make_windows

    model, tokenizer, _ = load_pruned_model(args.checkpoint, args.activation_mode, args.dtype)
    ids, desc = evaluation_tokens(args.data, tokenizer)
    windows = make_windows(ids, args.seqlen, max_windows=args.windows)  # [W, T]

    def token_nll(perturb: float) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        hook = model.get_input_embeddings().register_forward_hook(
            lambda mod, a, out: (out.float() * (1 + perturb * torch.randn(out.shape, generator=gen))).to(out.dtype)
        ) if perturb else None
        nll = []
        with torch.no_grad():
            for w in windows:
                logits = model(input_ids=w[None]).logits[0].float()  # [T, V]
                nll.append(-torch.log_softmax(logits[:-1], -1).gather(1, w[1:, None])[:, 0])
        if hook is not None:
            hook.remove()
        return torch.cat(nll)

    a, a_perturbed = token_nll(0.0), token_nll(args.perturb)
    del model

    served = []
    with launch(args.checkpoint, port=0, enforce_eager=True,
                extra_vllm_args=("--dtype", args.dtype, "--max-model-len", str(args.seqlen + 8))) as srv:
        srv.wait_ready(timeout=900)
        client = OpenAI(base_url=srv.url, api_key=srv.api_key, timeout=600)
        for w in windows:
            out = client.completions.create(model=srv.model, prompt=w.tolist(), max_tokens=1, echo=True,
                                            logprobs=0, temperature=0.0)
            lp = out.choices[0].logprobs.token_logprobs[1:args.seqlen]
            served.append(-torch.tensor(lp, dtype=torch.float32))

    b = torch.cat(served)
    diff, sensitivity = (a - b).abs(), (a - a_perturbed).abs()
    result = {"checkpoint": args.checkpoint, "data": desc, "windows": args.windows, "seqlen": args.seqlen,
              "dtype": args.dtype, "activation_mode_inprocess": args.activation_mode,
              "nll_inprocess": float(a.mean()), "nll_served": float(b.mean()),
              "mean_abs_token_diff": float(diff.mean()), "tokens_over_0.1_nats": float((diff > 0.1).float().mean()),
              "tokens": int(a.numel()),
              "inprocess_sensitivity": {"perturb": args.perturb, "nll_perturbed": float(a_perturbed.mean()),
                                        "mean_abs_token_diff": float(sensitivity.mean()),
                                        "tokens_over_0.1_nats": float((sensitivity > 0.1).float().mean())}}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
