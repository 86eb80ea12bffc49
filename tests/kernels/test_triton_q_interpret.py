"""The quantized Triton GEMM under the Triton interpreter, in a subprocess (TRITON_INTERPRET=1 must
be set before triton is imported and must not leak into the other tests)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")


def test_quantized_triton_gemm_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("triton_q_interpret_cases.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failures" in proc.stdout
