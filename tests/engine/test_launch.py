"""NPROC_PER_NODE=N tk train: the torchrun command, its exit code, and a real 2-process run on CPU (gloo)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.engine.launch import torchrun_command
from toolkit.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_single_process_needs_no_launcher():
    assert torchrun_command(["train", "c.py"], {}) is None
    assert torchrun_command(["train", "c.py"], {"NPROC_PER_NODE": "1"}) is None
    # inside torchrun the command is never re-launched
    assert torchrun_command(["train", "c.py"], {"NPROC_PER_NODE": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}) is None


def test_one_node():
    command = torchrun_command(["train", "c.py", "--seed", "3"], {"NPROC_PER_NODE": "2"})
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[3:] == ["--nproc_per_node=2", "--nnodes=1", "--node_rank=0", "--master_addr=127.0.0.1",
                           "--master_port=29500", "-m", "toolkit.cli.main", "train", "c.py", "--seed", "3"]


def test_several_nodes():
    env = {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "ADDR": "10.0.0.7", "PORT": "6000"}
    command = torchrun_command(["train", "c.py"], env)
    assert command[3:8] == ["--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.7",
                            "--master_port=6000"]
    # one process per node on several nodes still needs torchrun
    assert torchrun_command(["train", "c.py"], {"NNODES": "2", "NODE_RANK": "0"}) is not None


@pytest.mark.parametrize("env,message", [({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two'"),
                                         ({"NPROC_PER_NODE": "0"}, "must be >= 1"),
                                         ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2")])
def test_bad_environment(env, message):
    with pytest.raises(UserError, match=message):
        torchrun_command(["train", "c.py"], env)


def test_the_launchers_exit_code_comes_back(monkeypatch, capsys):
    from toolkit.engine import launch
    monkeypatch.setattr(launch, "torchrun_command", lambda argv: [sys.executable, "-c", "import sys; sys.exit(3)"])
    assert launch.relaunch(["train", "c.py"]) == 3
    monkeypatch.setattr(launch, "torchrun_command", lambda argv: None)
    assert launch.relaunch(["train", "c.py"]) is None  # one process: tk trains in this one


TINY_CONFIG = '''
from mmengine.optim import OptimWrapper
from torch.optim import AdamW
from toolkit.data.collate import sft_collate_fn
from toolkit.data.samplers import LengthGroupedSampler
from toolkit.engine.loops import TrainLoop
from toolkit.engine.synthetic import RandomTokenDataset
from toolkit.model.loader import load_causal_lm
from toolkit.model.sft import SupervisedFinetune

model = dict(type=SupervisedFinetune, llm=dict(type=load_causal_lm, path={model!r}, dtype='float32'))
train_dataloader = dict(batch_size=1, num_workers=0,
                        dataset=dict(type=RandomTokenDataset, vocab_size=256, seq_len=16, num_samples=8),
                        sampler=dict(type=LengthGroupedSampler, batch_size=1), collate_fn=dict(type=sft_collate_fn))
optim_wrapper = dict(type=OptimWrapper, optimizer=dict(type=AdamW, lr={lr!r}))
train_cfg = dict(type=TrainLoop, max_iters=3)
default_hooks = dict(logger=dict(type='LoggerHook', interval=1), checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=3))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
'''


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("launch_llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    return str(folder)


def _tk_train(config: Path, work: Path, port: int):
    env = dict(os.environ, NPROC_PER_NODE="2", PORT=str(port), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "toolkit.cli.main", "train", str(config), "--work-dir", str(work)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_two_processes_train_on_cpu(tiny_model, tmp_path):
    good = tmp_path / "good.py"
    good.write_text(TINY_CONFIG.format(model=tiny_model, lr=1e-3))
    done = _tk_train(good, tmp_path / "work", 29611)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--nproc_per_node=2" in done.stdout
    assert done.stdout.count("tk train: done") == 1  # printed by rank 0 only
    assert (tmp_path / "work" / "iter_3.pth").is_file()
    log = next((tmp_path / "work").glob("*/*.log")).read_text()
    assert "Distributed launcher: pytorch" in log and "Distributed training: True" in log
    assert "diff_rank_seed=True" in log  # a seed per rank

