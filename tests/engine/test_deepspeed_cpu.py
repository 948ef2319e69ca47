"""DeepSpeed through `tk train --deepspeed` on CPU (gloo): with ZeRO-2/3 two processes reach the one-process
losses on the same data and global batch, and the ZeRO checkpoint converts to the same weights; the
other presets (zero1, offload) reach them in one process.

The CPU twin of tests/gpu/test_multi_gpu.py, with a smaller model; needs DeepSpeed
(pip install --no-build-isolation deepspeed), skipped without it.
"""
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
from gpu_helpers import losses, make_llama, tk, tk_config, train  # noqa: E402

STEPS = 4


def config(model, bs):
    return tk_config(model, "full", seq=32, bs=bs, steps=STEPS, warmup=1, vocab=256, lr=1e-3, precision="fp32",
                     clip=1.0, samples=2 * STEPS, distinct=2, log_interval=1, save_every=STEPS, gc=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama_ds_cpu"), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, vocab_size=256)


def converted_weights(work):
    import torch
    from transformers import AutoModelForCausalLM
    result = tk("convert", "pth_to_hf", work / "cfg.py", work / f"iter_{STEPS}.pth", work / "hf")
    assert result.returncode == 0, result.stderr[-3000:]
    return AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def one_process(model, tmp_path_factory):
    work = tmp_path_factory.mktemp("one_process")
    train(work, config(model, bs=2))
    return losses(work), converted_weights(work)


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_zero_on_two_cpu_processes_matches_one(preset, model, one_process, tmp_path):
    import torch
    ref, expected = one_process
    train(tmp_path, config(model, bs=1), "--deepspeed", preset, nproc=2)
    got = losses(tmp_path)
    assert len(ref) == len(got) == STEPS and ref[-1] < ref[0]
    assert max(abs(a - b) / a for a, b in zip(ref, got)) < 1e-4, (ref, got)
    assert (tmp_path / f"iter_{STEPS}.pth").is_dir()  # a ZeRO checkpoint folder, read by convert
    actual = converted_weights(tmp_path)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("preset", ["zero1", "zero2_offload", "zero3_offload"])
def test_other_presets_match_in_one_process(preset, model, one_process, tmp_path):
    """One process (no torchrun: tk describes a world of one), the same batch of 2."""
    train(tmp_path, config(model, bs=2), "--deepspeed", preset)
    ref, got = one_process[0], losses(tmp_path)
    assert len(got) == STEPS
    assert max(abs(a - b) / a for a, b in zip(ref, got)) < 1e-4, (ref, got)


# A child `tk train` that, when DeepSpeed writes a file of the iter_4 checkpoint, writes half of it and SIGKILLs
# itself: a power cut in the middle of a checkpoint folder.
KILL_MID_FOLDER = """
import os, signal, sys, torch
save = torch.save
def save_and_die(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and "iter_4" in str(f):
        with open(f, "wb") as out:
            out.write(b"PK")
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)
torch.save = save_and_die
from toolkit.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_while_writing_a_deepspeed_folder_resumes_from_the_last_whole_one(model, tmp_path):
    import json
    import os
    import signal
    import subprocess
    cfg = tmp_path / "cfg.py"
    cfg.write_text(tk_config(model, "full", seq=32, bs=2, steps=6, warmup=1, vocab=256, lr=1e-3, precision="fp32",
                             samples=16, distinct=2, log_interval=1, save_every=2, gc=False))
    work = tmp_path / "work"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       str(Path(__file__).resolve().parents[2] / "tools")]))
    killed = subprocess.run([sys.executable, "-c", KILL_MID_FOLDER, "train", str(cfg), "--work-dir", str(work),
                             "--deepspeed", "zero2"], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (work / "iter_2.pth").is_dir() and not (work / "iter_4.pth").exists()
    assert [p for p in work.glob(".iter_4.pth.partial-*")]       # the cut folder, under its temporary name
    assert (work / "last_checkpoint").read_text().strip().endswith("iter_2.pth")

    resumed = tk("train", cfg, "--work-dir", work, "--deepspeed", "zero2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list(work.glob(".iter_*.partial-*"))                # removed at the start of the resumed run
    assert (work / "iter_6.pth").is_dir()
    scalars = sorted(work.glob("*/vis_data/scalars.json"))[-1]
    steps = [json.loads(line)["step"] for line in scalars.read_text().splitlines() if '"loss"' in line]
    assert steps == [3, 4, 5, 6]
