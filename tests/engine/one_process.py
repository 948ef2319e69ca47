"""Run a script as a one-process torch.distributed job on the CPU (gloo): what the DeepSpeed CPU tests need."""
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
from gpu_helpers import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def run_one_process(script: str, *args, **env):
    """Run ``script`` (``python -c``) from the repository root as rank 0 of 1, no CUDA, with extra ``env``;
    returns (the finished process, the JSON after its ``RESULT `` line or None)."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": "", **env}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return done, (json.loads(lines[0][7:]) if lines else None)
