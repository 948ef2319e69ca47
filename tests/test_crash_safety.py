"""Crash safety, for real: a training process SIGKILLed in the middle of writing a checkpoint leaves the
previous checkpoint loadable and ``--resume auto`` continues from it; an export killed mid-write leaves
OUT as it was; a work dir without room for a checkpoint is reported before training starts."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.checkpoint import latest_complete_checkpoint, load_checkpoint
from toolkit.cli.main import main
from toolkit.config import load_config
from toolkit.engine.runner import prepare

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "smollm2_135m_instruct_lora_champ_e3"
FAST = ["custom_hooks.1.evaluation_inputs=[]", "default_hooks.logger.interval=1"]

# Runs `tk` in a child that, when it writes the file whose name holds KILL_AT, writes half of it and then
# SIGKILLs itself: a power cut in the middle of a checkpoint save.
KILLER = """
import os, signal, sys
from mmengine.fileio.backends import local_backend

put = local_backend.LocalBackend.put
def put_and_die(self, obj, filepath):
    if os.environ["KILL_AT"] in os.path.basename(str(filepath)):
        with open(filepath, "wb") as f:
            f.write(obj[: len(obj) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return put(self, obj, filepath)
local_backend.LocalBackend.put = put_and_die

import toolkit.model.meta as meta
write_meta = meta.write_meta
def write_meta_and_die(folder, **kwargs):  # pth_to_hf: weights written, the folder not yet complete
    write_meta(folder, **kwargs)
    if os.environ["KILL_AT"] == "export":
        os.kill(os.getpid(), signal.SIGKILL)
meta.write_meta = write_meta_and_die
import toolkit.model.export  # noqa: binds write_meta by name: patch it there too
toolkit.model.export.write_meta = write_meta_and_die

from toolkit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def child_env(**extra) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)


def run_killed(argv: list, kill_at: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, *argv], env=child_env(KILL_AT=kill_at),
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory, tiny_llama_dir) -> Path:
    folder = tmp_path_factory.mktemp("crash_cfg")
    assert main(["copy-cfg", SHIPPED, str(folder)]) == 0
    path = folder / f"{SHIPPED}_copy.py"
    text = path.read_text()
    for key, value in dict(pretrained_model_name_or_path=tiny_llama_dir, max_length=64, drop_long_samples=False,
                           val_size=0, save_steps=2, save_total_limit=1, logging_steps=1).items():
        text, n = re.subn(rf"^{key} = [^#\n]*", f"{key} = {value!r}  ", text, count=1, flags=re.M)
        assert n == 1, key
    path.write_text(text)
    return path


def logged_steps(run_dir: Path) -> list:
    lines = [json.loads(line) for line in (run_dir / "vis_data" / "scalars.json").read_text().splitlines()]
    return [line["step"] for line in lines if "loss" in line]


def test_sigkill_while_saving_keeps_the_previous_checkpoint_and_resume_auto_uses_it(tiny_cfg, tmp_path):
    work = tmp_path / "work"
    argv = ["train", str(tiny_cfg), "--work-dir", str(work), "--cfg-options", "train_cfg.max_iters=6", *FAST]
    killed = run_killed(argv, kill_at="iter_4.pth")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    # max_keep_ckpts=1: mmengine alone deletes iter_2 before writing iter_4, leaving nothing to resume from
    assert (work / "last_checkpoint").read_text().strip() == str(work / "iter_2.pth")
    assert load_checkpoint(work / "iter_2.pth")["meta"]["iter"] == 2
    assert not (work / "iter_4.pth").exists()
    leftovers = list(work.glob(".iter_4.pth.partial-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the cut write, under its temporary name

    resumed = subprocess.run([sys.executable, "-m", "toolkit.cli.main", *argv, "--resume", "auto"],
                             env=child_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = sorted(p for p in work.iterdir() if p.is_dir())
    assert len(runs) == 2
    assert logged_steps(runs[0]) == [1, 2, 3, 4]  # iteration 4 was logged, then died while being saved
    assert logged_steps(runs[1]) == [3, 4, 5, 6]  # resumed after iteration 2
    assert "resumed from" not in resumed.stdout or "iter_2.pth" in resumed.stdout
    assert sorted(p.name for p in work.glob("*.pth")) == ["iter_6.pth"]  # the limit of 1 kept checkpoint holds
    assert not list(work.glob(".*partial*"))  # the killed run's half file is gone
    assert load_checkpoint(work / "iter_6.pth")["meta"]["iter"] == 6


def test_resume_auto_skips_a_cut_checkpoint_that_last_checkpoint_names(tiny_cfg, tmp_path):
    """A checkpoint cut by an older writer (or a full disk): --resume auto takes the newest whole one."""
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"state_dict": {}, "meta": {}}, work / "iter_2.pth")
    whole = (work / "iter_2.pth").read_bytes()
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "meta": {}}, work / "iter_4.pth")
    cut = (work / "iter_4.pth").read_bytes()
    (work / "iter_4.pth").write_bytes(cut[: len(cut) // 2])
    (work / "last_checkpoint").write_text(str(work / "iter_4.pth"))
    assert latest_complete_checkpoint(work) == work / "iter_2.pth"
    cfg = prepare(load_config(str(tiny_cfg)), work_dir=str(work), resume="auto")
    assert cfg.resume is True and cfg.load_from == str(work / "iter_2.pth")
    assert (work / "iter_2.pth").read_bytes() == whole
    (work / "last_checkpoint").write_text("")  # an empty pointer (killed while mmengine rewrote it)
    assert latest_complete_checkpoint(work) == work / "iter_2.pth"
    # DeepSpeed checkpoints are folders of torch.save files: one cut file makes the folder incomplete
    for step, cut_one in ((6, False), (8, True)):
        folder = work / f"iter_{step}.pth"
        folder.mkdir()
        torch.save({"module": {}}, folder / "mp_rank_00_model_states.pt")
        torch.save({"optimizer": torch.zeros(1000)}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        if cut_one:
            data = (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes()
            (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(data[: len(data) // 2])
    assert latest_complete_checkpoint(work) == work / "iter_6.pth"
    shutil.rmtree(work)
    cfg = prepare(load_config(str(tiny_cfg)), work_dir=str(work), resume="auto")
    assert cfg.resume is False and cfg.load_from is None


def test_export_killed_midway_leaves_out_untouched(tiny_cfg, tmp_path):
    work = tmp_path / "work"
    assert main(["train", str(tiny_cfg), "--work-dir", str(work), "--cfg-options", "train_cfg.max_iters=2",
                 *FAST]) == 0
    checkpoint = str(work / "iter_2.pth")
    fresh = tmp_path / "fresh"
    killed = run_killed(["convert", "pth_to_hf", str(tiny_cfg), checkpoint, str(fresh)], kill_at="export")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not fresh.exists()  # only a hidden staging folder, never a half OUT

    old = tmp_path / "old"
    old.mkdir()
    (old / "mine.txt").write_text("keep me")
    killed = run_killed(["convert", "pth_to_hf", str(tiny_cfg), checkpoint, str(old), "--force"], kill_at="export")
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in old.iterdir()] == ["mine.txt"] and (old / "mine.txt").read_text() == "keep me"

    assert main(["convert", "pth_to_hf", str(tiny_cfg), checkpoint, str(old), "--force"]) == 0
    assert (old / "adapter_model.safetensors").is_file() and not (old / "mine.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".old")]  # the replaced copy is gone


def test_full_work_dir_is_reported_before_training(tiny_cfg, tmp_path, monkeypatch, capsys):
    import shutil as shutil_module
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    work = tmp_path / "work"
    assert main(["train", str(tiny_cfg), "--work-dir", str(work), "--cfg-options", "train_cfg.max_iters=2",
                 *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"tk train: error: work dir {re.escape(str(work))} has 10 MiB free but a checkpoint "
                        r"\(and the logs\) need about \d+ MiB; free some space or choose another --work-dir", err), err
    assert not list(work.glob("*.pth")) and not list(work.glob("*/vis_data/scalars.json"))


def test_a_run_that_saves_no_checkpoint_needs_no_room_for_one(tiny_cfg, tmp_path, monkeypatch):
    """default_hooks.checkpoint=None (benchmarks, smoke runs): the free-space check has nothing to guard."""
    import shutil as shutil_module
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    work = tmp_path / "work"
    assert main(["train", str(tiny_cfg), "--work-dir", str(work), "--cfg-options", "train_cfg.max_iters=2",
                 "default_hooks.checkpoint=None", *FAST]) == 0
    assert not list(work.glob("*.pth"))
