"""The main job runs end to end and its answers equal PEFT's (the demo itself checks them and exits 1 otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_serves_mixed_requests_like_peft():
    cmd = [sys.executable, "-m", "peft_kernels", "demo", "--size", "tiny", "--batches", "1", "--new-tokens", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "answers equal to PEFT's (run adapter by adapter): 8/8 requests" in out.stdout
    for provider in ("peft_kernels", "peft", "base"):
        assert f"\n{provider} " in out.stdout
