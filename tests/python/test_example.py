"""examples/moe_layer.py runs and agrees with its dense reference."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "moe_layer.py")


def _run(*args):
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                          timeout=120)


def test_numpy_forward():
    p = _run("--ranks", "3", "--experts", "6", "--numpy")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK" in p.stdout


def test_torch_forward_backward():
    pytest.importorskip("torch")
    p = _run("--ranks", "2", "--tokens", "16")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "OK" in p.stdout
