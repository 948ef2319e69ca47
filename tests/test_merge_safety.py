"""`tk convert merge` checks the merged model against base + adapter on a probe input: it prints the largest
logit difference, and a merge that changes the model fails with one line and leaves OUT as it was.
(Refusing adapters that cannot be merged, tq and vqc-expval: tests/model/test_quantum_model.py.)"""
from __future__ import annotations

import re

import pytest
import torch

from toolkit.cli.main import main
from toolkit.model import merge as merge_module


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_llama_dir) -> str:
    """A peft LoRA folder on the tiny llama with non-zero B (so merging really changes the weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    model.save_pretrained(folder)
    return str(folder)


def probe_logits(model, tiny_llama_dir) -> torch.Tensor:
    from transformers import AutoTokenizer
    ids = merge_module.probe_ids(AutoTokenizer.from_pretrained(tiny_llama_dir), "cpu")
    return merge_module.probe_logits(model, ids)


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_merge_prints_the_largest_difference_and_it_is_real(dtype, torch_dtype, lora_adapter, tiny_llama_dir,
                                                            tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = tmp_path / "merged"
    assert main(["convert", "merge", tiny_llama_dir, lora_adapter, str(out), "--device", "cpu",
                 "--dtype", dtype]) == 0
    printed = re.search(r"merge check: max \|merged - unmerged\| logit difference (\S+) on a probe input "
                        rf"\(tolerance (\S+) in {dtype}\)", capsys.readouterr().out)
    assert printed, "the merge check's figure is not printed"
    difference, tolerance = float(printed.group(1)), float(printed.group(2))
    assert difference <= tolerance
    # the figure is the one a user gets by comparing the folders themselves
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch_dtype)
    adapted = probe_logits(PeftModel.from_pretrained(base, lora_adapter), tiny_llama_dir)
    merged = probe_logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype), tiny_llama_dir)
    measured = (merged - adapted).abs().max().item()
    assert measured == pytest.approx(difference, rel=0.01, abs=1e-6)
    if torch_dtype == torch.float32:
        assert difference < 1e-4
    # the adapter does change the model: the check compares against base + adapter, not the base alone
    plain = probe_logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch_dtype), tiny_llama_dir)
    assert (plain - adapted).abs().max().item() > 10 * tolerance or torch_dtype != torch.float32


def test_a_merge_that_changes_the_model_fails_and_writes_nothing(lora_adapter, tiny_llama_dir, tmp_path, capsys,
                                                                 monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner
    real = BaseTuner.merge_and_unload

    def broken(self, *args, **kwargs):  # e.g. a merge that forgot the LoRA scaling on one layer
        model = real(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", broken)
    out = tmp_path / "merged"
    assert main(["convert", "merge", tiny_llama_dir, lora_adapter, str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not re.search(r"\d+%\|", line)]  # progress bars
    assert len(lines) == 1 and "Traceback" not in err, err
    err = lines[0]
    assert re.fullmatch(r"tk convert: error: the merged model's logits differ from base \+ adapter by up to \S+ on a "
                        r"probe input \(tolerance \S+ in float32\); nothing was written: .*", err), err
    assert not out.exists() and not list(tmp_path.iterdir())

    out.mkdir()  # with --force an existing OUT stays as it was
    (out / "mine.txt").write_text("keep")
    assert main(["convert", "merge", tiny_llama_dir, lora_adapter, str(out), "--device", "cpu", "--force"]) == 2
    assert [p.name for p in out.iterdir()] == ["mine.txt"]

