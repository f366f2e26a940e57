"""Regression: `import disco` before `import torch` must not break torch.

libdisco needs libnccl.so.2; if it loads first, the process keeps that NCCL and
a torch built against a newer one fails to import (seen: undefined symbol
ncclCommResume). The binding loads torch's NCCL first when torch is installed.
"""

import importlib.util
import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_disco_then_torch_imports():
    env = dict(os.environ)
    code = "import disco, torch; torch.zeros(1); print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
