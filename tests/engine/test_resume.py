"""Exact resume: a run SIGKILLed after its checkpoint at iteration k and resumed with ``--resume auto``
logs the same losses for k+1..n as a run never interrupted (LoRA dropout on, validation in between)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from toolkit.cli.main import main

from conftest import FAST, train_losses

N, K = 8, 4
# Runs tk train in a child that kills itself with SIGKILL right after the checkpoint of iteration K.
KILLER = f"""
import os, signal, sys
from mmengine.hooks import Hook
import toolkit.engine.runner as engine_runner  # tk train imports build_runner from here when it runs

class KillAfterCheckpoint(Hook):
    priority = 'LOWEST'  # after CheckpointHook (VERY_LOW) has written iter_{K}.pth

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 == {K}:
            os.kill(os.getpid(), signal.SIGKILL)

build = engine_runner.build_runner
def build_and_arm(cfg):
    runner = build(cfg)
    runner.register_hook(KillAfterCheckpoint())
    return runner
engine_runner.build_runner = build_and_arm
from toolkit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_auto_logs_the_same_losses(tiny_config, tmp_path):
    cfg = tiny_config(save_steps=2, save_total_limit=10, val_size=6, val_interval=3)
    options = ["--cfg-options", f"train_cfg.max_iters={N}", "model.adapter.lora_dropout=0.3", *FAST]
    whole = tmp_path / "whole"
    assert main(["train", str(cfg), "--work-dir", str(whole), *options]) == 0
    expected = train_losses(whole)
    assert sorted(expected) == list(range(1, N + 1))

    cut = tmp_path / "cut"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    killed = subprocess.run([sys.executable, "-c", KILLER, "train", str(cfg), "--work-dir", str(cut), *options],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (cut / "last_checkpoint").read_text().strip().endswith(f"iter_{K}.pth")
    assert sorted(train_losses(cut)) == list(range(1, K + 1))

    resumed = subprocess.run([sys.executable, "-m", "toolkit.cli.main", "train", str(cfg), "--work-dir", str(cut),
                              "--resume", "auto", *options], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = train_losses(cut)
    assert sorted(got) == list(range(1, N + 1))
    for step in range(K + 1, N + 1):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    # the losses before the cut also agree: one process or another, same numbers
    assert all(abs(got[step] - expected[step]) <= 1e-6 for step in range(1, K + 1))
    # the loss plot's history was carried through the checkpoint: the resumed plot shows the whole run
    history = json.loads((cut / "loss_history.json").read_text())
    assert [step for step, _ in history["train"]] == list(range(1, N + 1))
    assert [step for step, _ in history["val"]] == [3, 6, 8]


def test_two_processes_resume_with_each_ranks_generators(tiny_config, tmp_path):
    """Two processes (gloo on the CPU, through torchrun as `tk train` launches them): a run resumed from the
    checkpoint of iteration 2 logs the losses of the uninterrupted run for iterations 3 and 4. mmengine
    writes checkpoints from rank 0 alone, so each rank's generator states are gathered into it beforehand;
    with rank 0's states alone, rank 1 would draw other LoRA dropout masks and, through the averaged
    gradients, change rank 0's next loss."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
    from gpu_helpers import tk
    cfg = tiny_config(save_steps=2, save_total_limit=10)
    options = ["--cfg-options", "train_cfg.max_iters=4", "model.adapter.lora_dropout=0.3", *FAST]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    result = tk("train", cfg, "--work-dir", whole, *options, nproc=2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    expected = train_losses(whole)
    assert sorted(expected) == [1, 2, 3, 4]
    result = tk("train", cfg, "--work-dir", cut, "--resume", whole / "iter_2.pth", *options, nproc=2)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "no random generator states" not in result.stdout + result.stderr
    got = train_losses(cut)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
