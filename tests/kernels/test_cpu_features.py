"""The OS-level CPU feature checks (kernels/cpu_features.py): AMX tile state is requested, not assumed.

Each check runs in a fresh interpreter: the permission is process-wide and any oneDNN matmul in the
test process (torch's bf16 matmul on an AMX host) would have asked for it already.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from duoserve.kernels import cpu_features

needs_amx = pytest.mark.skipif(not cpu_features.cpu_has_amx(), reason="the CPU has no AMX (no amx_tile flag)")


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_request_is_refused_with_a_reason_without_amx():
    if cpu_features.cpu_has_amx():
        pytest.skip("this CPU has AMX")
    outcome = cpu_features.request_amx_tile_state()
    assert not outcome.granted and "AMX" in outcome.reason
    assert not cpu_features.amx_tile_permitted()


@needs_amx
def test_request_grants_tile_state_in_a_fresh_process():
    got = _fresh("import json\n"
                 "from duoserve.kernels import cpu_features as c\n"
                 "before = c.amx_tile_permitted()\n"
                 "r = c.request_amx_tile_state()\n"
                 "print(json.dumps({'before': before, 'granted': r.granted, 'reason': r.reason,"
                 " 'after': c.amx_tile_permitted()}))")
    assert got["granted"] and got["after"], got
