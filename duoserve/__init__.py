"""duoserve: dual-sparse pruning of Hugging Face LLMs and serving with vLLM."""

__version__ = "0.1.0"
