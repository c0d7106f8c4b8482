"""Start a script on 2 CPU ranks with torchrun (gloo), as CI does."""

from __future__ import annotations

import os
import subprocess
import sys


def run_torchrun(script: str, *args: str, timeout: float = 600) -> None:
    """Run `script` on 2 CPU ranks; fail with both ranks' output when it does not exit cleanly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
