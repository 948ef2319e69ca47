"""Several processes for one ``tk train``: ``NPROC_PER_NODE=N tk train ...`` re-runs itself through torchrun.

Environment (the names XTuner users know): NPROC_PER_NODE (processes on this node), NNODES (default 1),
NODE_RANK (default 0), ADDR (master address, default 127.0.0.1), PORT (master port, default 29500).
The launching process waits for torchrun and returns its exit code.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ..errors import UserError


def _int_env(env, name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"{name}={value!r}: must be a whole number") from None
    if number < 0 or (number == 0 and name != "NODE_RANK"):
        raise UserError(f"{name}={value!r}: must be {'>= 0' if name == 'NODE_RANK' else '>= 1'}")
    return number


def inside_launcher(env=None) -> bool:
    """True in a process that torchrun (or another launcher) started."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def torchrun_command(argv: list, env=None) -> list | None:
    """The torchrun command that runs ``tk <argv>`` once per process, or None for a single process."""
    env = os.environ if env is None else env
    if inside_launcher(env):
        return None
    nproc, nnodes = _int_env(env, "NPROC_PER_NODE", 1), _int_env(env, "NNODES", 1)
    if nproc * nnodes <= 1:
        return None
    node_rank = _int_env(env, "NODE_RANK", 0)
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} but NNODES={nnodes}: ranks run from 0 to NNODES-1")
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            f"--node_rank={node_rank}", f"--master_addr={env.get('ADDR') or '127.0.0.1'}",
            f"--master_port={_int_env(env, 'PORT', 29500)}", "-m", "toolkit.cli.main", *argv]


def relaunch(argv: list) -> int | None:
    """Run ``tk <argv>`` through torchrun when asked for several processes; its exit code, else None."""
    command = torchrun_command(argv)
    if command is None:
        return None
    print("tk: launching " + " ".join(command[2:]), flush=True)
    return subprocess.run(command).returncode


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_group_env() -> None:
    """DeepSpeed and FSDP need a process group even for one process: describe a world of one."""
    if inside_launcher():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))



@HOOKS.register_module()
class MeanLossHook(Hook):
    """Logs the loss (and every other scalar output) averaged over all ranks, not rank 0's alone.

    Runs before mmengine's RuntimeInfoHook puts the outputs into the message hub; one scalar
    all-reduce per value and iteration. tk adds it to every run of several processes.
    """
    priority = "HIGHEST"

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if outputs is None or not dist.is_available() or not dist.is_initialized():
            return
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                mean = value.detach().float().clone()
                dist.all_reduce(mean)
                outputs[key] = mean / dist.get_world_size()
