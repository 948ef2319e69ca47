"""Helpers for engine tests: a copy of the shipped LoRA config on the tiny llama, and its logged scalars."""
import json
import re
from pathlib import Path

import pytest

from toolkit.cli.main import main

#: no eval-chat answers (they cost seconds on a CPU), every scalar logged each iteration
FAST = ["custom_hooks.1.evaluation_inputs=[]", "default_hooks.logger.interval=1"]


def make_tiny_config(folder: Path, tiny_llama_dir: str, **settings) -> Path:
    """Copy the LoRA config into ``folder``, point it at the tiny llama and set PART 1 ``settings``."""
    assert main(["copy-cfg", "smollm2_135m_instruct_lora_champ_e3", str(folder)]) == 0
    path = folder / "smollm2_135m_instruct_lora_champ_e3_copy.py"
    text = path.read_text()
    base = dict(pretrained_model_name_or_path=tiny_llama_dir, max_length=128, drop_long_samples=False,
                lr=1e-2, logging_steps=1)
    for key, value in {**base, **settings}.items():
        text, n = re.subn(rf"^{key} = [^#\n]*", f"{key} = {value!r}  ", text, count=1, flags=re.M)
        assert n == 1, f"{key} not in the config"
    path.write_text(text)
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_llama_dir):
    """``tiny_config(**settings)``: a fresh copy of the LoRA config on the tiny llama."""
    def make(**settings) -> Path:
        folder = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*')))}"
        return make_tiny_config(folder, tiny_llama_dir, **settings)
    return make


def scalars(work_dir: Path) -> list:
    """Every line of every run's ``vis_data/scalars.json`` under ``work_dir``, oldest run first."""
    lines = []
    for path in sorted(Path(work_dir).glob("*/vis_data/scalars.json")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def train_losses(work_dir: Path) -> dict:
    """{iteration: loss} as logged (logging interval 1: each iteration's own loss)."""
    return {line["step"]: line["loss"] for line in scalars(work_dir) if "loss" in line and "lr" in line}
