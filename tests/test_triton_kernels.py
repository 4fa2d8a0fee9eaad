"""The Triton kernels of the GPU TopK path (mri/dictionaries/triton_kernels.py), checked on the CPU.

Triton's interpreter runs them on CPU tensors, but only in a process where TRITON_INTERPRET=1 was set
before Triton was first imported; transformers and torch import it early in this one. So the checks,
tests/triton_interpreted.py, run in a fresh process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).with_name("triton_interpreted.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernels_match_pytorch_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("MRI_TRITON", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CHECKS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "8 passed" in run.stdout, run.stdout[-2000:]
