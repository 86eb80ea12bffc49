"""The checkpoint contract between `duoserve prune` and its readers (docs/checkpoint-format.md)."""
from duoserve.format.schema import (  # noqa: F401
    DEFAULT_IGNORE, DEFAULT_TARGETS, FORMAT_VERSION, QUANT_METHOD, SUPPORTED_FORMAT_VERSIONS,
    ActivationSparsity, ModuleInfo, QuantizationConfig, is_target, parse_structure,
)
