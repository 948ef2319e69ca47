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
