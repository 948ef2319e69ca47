"""Shared by the GPU tests: small random llamas, generated configs, and `tk train` in a child process
(each run gets a fresh CUDA context, so peak memory and DeepSpeed's process group start clean)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from benchmark import tk_config  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
SEED_MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024)


def fp32_steps_config(model: str, method: str = "full", bs: int = 1, steps: int = 8, **options) -> str:
    """A tk config for the strategy comparisons: ``steps`` fp32 steps of 256 tokens, no clipping, a loss logged
    every step and a checkpoint at the end (small random llama, 4 distinct samples)."""
    return tk_config(model, method, seq=256, bs=bs, steps=steps, warmup=2, vocab=1024, lr=1e-3, precision="fp32",
                     clip=None, samples=16, distinct=4, log_interval=1, save_every=steps, **options)


def make_llama(folder: Path, dtype=torch.float32, **shape) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **{**SEED_MODEL, **shape})
        LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    return str(folder)


def env(nproc: int = 1) -> dict:
    out = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1")
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tools"), out.get("PYTHONPATH")]))
    out.pop("NPROC_PER_NODE", None)
    if nproc > 1:
        out.update(NPROC_PER_NODE=str(nproc), PORT=str(free_port()))
    return out


def free_port() -> int:
    """A TCP port the OS says is free now (a fixed or pid-derived one can be taken by another run, or still
    held in TIME_WAIT by the previous test's rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tk(*args, nproc: int = 1, log: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "toolkit.cli.main", *map(str, args)], cwd=ROOT, env=env(nproc),
                            capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(result.stdout + result.stderr)
    return result


def train(work: Path, config_text: str, *extra, nproc: int = 1) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "cfg.py"
    cfg.write_text(config_text)
    result = tk("train", cfg, "--work-dir", work, *extra, nproc=nproc, log=work / "tk_train.log")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def losses(work: Path) -> list:
    """The logged loss of every iteration (configs here log every iteration)."""
    scalars = sorted(work.glob("*/vis_data/scalars.json"))[-1]
    rows = [json.loads(line) for line in scalars.read_text().splitlines() if line.strip()]
    return [row["loss"] for row in rows if "loss" in row]


def throughput(work: Path) -> dict:
    return json.loads((work / "throughput.json").read_text())


def report(name: str, **values) -> None:
    """One line per check, collected by tools/run_gpu_tests.sh into its summary."""
    line = json.dumps({"check": name, **values})
    print("GPU-RESULT", line)
    out = os.environ.get("TK_GPU_RESULTS")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
