"""Hooks on their own: the FLOPs formula, the peak table, the loss plot refreshing as it goes, the progress
bar, and RNG states surviving a weights_only checkpoint round trip."""
import io
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.logging import MessageHub

from toolkit.checkpoint import allow_mmengine_checkpoints
from toolkit.engine.hooks import LossPlotHook, ProgressBarHook
from toolkit.engine.hooks.random_state import capture_rng_state, restore_rng_state
from toolkit.engine.hooks.throughput import matmul_params, peak_tflops, sequence_lengths, train_flops


def test_flops_formula_full_and_adapter():
    attention = 12 * 2 * 64 * (3 * 3 + 5 * 5)
    assert train_flops([3, 5], 1000, 1000, layers=2, hidden=64) == 6 * 1000 * 8 + attention
    assert train_flops([3, 5], 1000, 10, layers=2, hidden=64) == (4 * 1000 + 6 * 10) * 8 + attention


def test_sequence_lengths_padded_and_packed():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert sequence_lengths({"input_ids": torch.zeros(2, 5), "attention_mask": mask}) == [3, 5]
    packed = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert sequence_lengths({"input_ids": torch.zeros(1, 9), "position_ids": packed}) == [3, 2, 4]
    assert sequence_lengths({"input_ids": torch.zeros(2, 7)}) == [7, 7]


def test_matmul_params_leave_out_the_input_embedding(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    everything = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    assert matmul_params(model) == (everything - embedding, everything - embedding)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    # q_proj is 64x64 in each of 2 layers: A (4x64) + B (64x4) per layer
    assert matmul_params(lora) == (everything - embedding + 2 * 512, 2 * 512)


@pytest.mark.parametrize("adapter", [False, True])
def test_flops_formula_agrees_with_torch_flop_counter(tiny_llama_dir, adapter):
    """The documented formula vs the matmuls torch actually runs for one forward + backward."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    if adapter:
        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    n_params, n_trainable = matmul_params(model)
    estimate = train_flops([64, 64], n_params, n_trainable, layers=2, hidden=64)
    assert counter.get_total_flops() == pytest.approx(estimate, rel=0.02)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 125.0),
                                        ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 4090", 165.0),
                                        ("cpu", None), (None, None)])
def test_peak_table(name, peak):
    assert peak_tflops(name) == peak


def fake_runner(tmp_path, iteration=0):
    return SimpleNamespace(iter=iteration, work_dir=str(tmp_path), experiment_name="unit", _resume=True,
                           message_hub=MessageHub.get_instance("tk-unit"), train_loop=object())


def test_loss_plot_is_refreshed_during_training_and_survives_a_checkpoint(tmp_path):
    hook = LossPlotHook(interval=2)
    runner = fake_runner(tmp_path)
    for step in range(3):
        runner.iter = step
        hook.after_train_iter(runner, step, outputs={"loss": torch.tensor(5.0 - step)})
        if step == 0:
            assert not (tmp_path / "loss.png").exists()
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"  # drawn at iteration 2, before the end
    hook.after_val_epoch(runner, metrics={"val/loss": 4.5})
    checkpoint = {"meta": {}}
    hook.before_save_checkpoint(runner, checkpoint)
    resumed = LossPlotHook(interval=2)
    resumed.after_load_checkpoint(runner, checkpoint)
    assert resumed.train == [[1, 5.0], [2, 4.0], [3, 3.0]] and resumed.val == [[2, 4.5]]


def test_progress_bar_counts_from_the_resumed_iteration(tmp_path, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    runner = fake_runner(tmp_path, iteration=2)
    runner.max_iters = 5
    hook = ProgressBarHook(disable=False)
    hook.before_train(runner)
    for step in range(2, 5):
        hook.after_train_iter(runner, step, outputs={"loss": torch.tensor(1.25)})
    hook.after_train(runner)
    text = stream.getvalue()
    assert "train" in text and "5/5" in text and "loss=1.2500" in text and "<00:00" in text  # ETA shown


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    allow_mmengine_checkpoints()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save({"meta": {"rng_state": capture_rng_state()}}, tmp_path / "c.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(torch.load(Path(tmp_path / "c.pth"), weights_only=True)["meta"]["rng_state"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
