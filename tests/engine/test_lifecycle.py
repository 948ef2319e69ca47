"""One short LoRA run on the tiny llama with validation, and what it leaves behind: the best checkpoint
by validation loss (value checked against an independent computation), save_total_limit, loss plot,
tensorboard scalars, throughput figures, eval-chat answers, dataset info and the summary."""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from toolkit.cli.main import main

from conftest import make_tiny_config, scalars, train_losses

N, VAL = 6, 6


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("lifecycle")
    cfg = make_tiny_config(root, tiny_llama_dir, val_size=VAL, val_interval=2, save_steps=2, save_total_limit=1,
                           evaluation_freq=3, warmup_ratio=0.34)
    work_dir = root / "work"
    assert main(["train", str(cfg), "--work-dir", str(work_dir), "--cfg-options", f"train_cfg.max_iters={N}",
                 "custom_hooks.1.max_new_tokens=4", "custom_hooks.2.peak_tflops=0.5"]) == 0
    return cfg, work_dir


def val_points(work_dir: Path) -> dict:
    return {line["step"]: line["val/loss"] for line in scalars(work_dir) if "val/loss" in line}


def test_best_checkpoint_is_the_lowest_validation_loss_and_old_ones_are_pruned(run):
    _, work_dir = run
    points = val_points(work_dir)
    assert sorted(points) == [2, 4, 6]
    best_iter = min(points, key=points.get)
    assert [p.name for p in work_dir.glob("best_*.pth")] == [f"best_val_loss_iter_{best_iter}.pth"]
    assert [p.name for p in work_dir.glob("iter_*.pth")] == ["iter_6.pth"]  # save_total_limit = 1
    summary = json.loads((work_dir / "summary.json").read_text())
    assert summary["best_checkpoint"] == str(work_dir / f"best_val_loss_iter_{best_iter}.pth")
    assert summary["best_val_loss"] == pytest.approx(points[best_iter], abs=1e-6)
    assert summary["last_checkpoint"] == str(work_dir / "iter_6.pth")
    assert summary["convert"].startswith("tk convert pth_to_hf ") and summary["convert"].endswith(
        f"best_val_loss_iter_{best_iter}.pth {work_dir / 'hf'}")


def test_validation_loss_equals_an_independent_computation(run, tiny_llama_dir):
    """val/loss at the end == token-weighted mean loss of the final weights over the held-out samples."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from toolkit.builder import build
    from toolkit.checkpoint import load_model_state
    from toolkit.config import load_config
    from toolkit.data.encode import IGNORE_INDEX
    from toolkit.model.loss import causal_lm_loss
    from toolkit.model.sft import SupervisedFinetune
    cfg, work_dir = run
    val = build(load_config(str(cfg)).val_dataloader.dataset)
    assert len(val) == VAL
    adapter = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                         task_type="CAUSAL_LM")
    model = SupervisedFinetune(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32), adapter)
    missing = model.load_state_dict(load_model_state(work_dir / "iter_6.pth"), strict=False)
    assert not missing.unexpected_keys
    model.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for item in val:
            ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(causal_lm_loss(model.llm, ids, labels)) * n
            tokens += n
    assert val_points(work_dir)[6] == pytest.approx(total / tokens, abs=1e-4)


def test_loss_plot_and_history_match_the_logged_losses(run):
    _, work_dir = run
    png = (work_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    history = json.loads((work_dir / "loss_history.json").read_text())
    logged = train_losses(work_dir)
    assert [step for step, _ in history["train"]] == list(range(1, N + 1))
    assert all(abs(loss - logged[step]) < 1e-4 for step, loss in history["train"])
    assert history["val"] == [[step, pytest.approx(loss, abs=1e-6)] for step, loss in val_points(work_dir).items()]


def test_tensorboard_holds_train_and_validation_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, work_dir = run
    events = EventAccumulator(str(next(work_dir.glob("*/vis_data")))).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "tflops", "mfu", "val/loss"} <= tags
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx(list(val_points(work_dir).values()),
                                                                          abs=1e-5)


def test_throughput_and_schedule_are_logged_every_iteration(run):
    _, work_dir = run
    lines = [line for line in scalars(work_dir) if "tokens_per_sec" in line]
    assert [line["step"] for line in lines] == list(range(1, N + 1))
    for line in lines:
        assert line["tokens_per_sec"] > 0 and line["tflops"] > 0 and line["peak_rss_gib"] > 0.1
        assert line["mfu"] == pytest.approx(line["tflops"] / 0.5, rel=1e-6)  # peak_tflops=0.5 in the run
    # warmup_ratio 0.34 of 6 iterations -> 3 warmup steps from 0, then cosine to 0 (lr of the step before)
    lrs = [line["lr"] for line in lines]
    expected = [0.0, 1e-2 / 3, 2e-2 / 3, 1e-2] + [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in (1, 2)]
    assert lrs == pytest.approx(expected, abs=1e-9)


def test_eval_chat_dataset_info_and_summary_in_the_log(run):
    _, work_dir = run
    answers = [json.loads(line) for line in (work_dir / "eval_chat.jsonl").read_text().splitlines()]
    assert [(a["tag"], a["iter"]) for a in answers] == [("before training", 0), ("iter 3", 3), ("after training", 6)]
    log = next(work_dir.glob("*/*.log")).read_text()
    assert f"validation set: {VAL} samples" in log and "[no loss]" in log
    total = int(re.search(r"dataset: (\d+) samples", log).group(1))
    assert f"train set: {total - VAL} samples" in log
    assert "run summary (also in summary.json)" in log and "throughput: " in log
    summary = json.loads((work_dir / "summary.json").read_text())
    for key in ("loss_plot", "eval_chat", "tensorboard", "log", "last_checkpoint"):
        assert Path(summary[key]).exists(), key
    assert summary["throughput"]["tokens_per_sec"] > 0
