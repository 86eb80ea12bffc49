"""duoserve.evaluation: the quality of a model or checkpoint, in-process or through an endpoint.

- texts.py: the evaluation texts (wikitext2, the packaged samples, the held-out calibration split
  `c4-heldout`, local files) and their tokenization.
- perplexity.py, perplexity_cli.py: perplexity with the standard protocol; `duoserve eval ppl`.
- zeroshot/: zero-shot accuracy with lm-evaluation-harness, in-process or through a served
  endpoint (HTTP); `duoserve eval zeroshot`.
- cli.py: `duoserve eval`, which dispatches to the two.

Models are loaded with duoserve.prune's loaders (a checkpoint with its activation sparsity, or a
dense model); duoserve.prune never imports this package. Never imports vLLM. See docs/evaluation.md.
"""
