"""The path a user walks, on a tiny random llama with SmolLM2's real tokenizer and real CHAMP data:
copy-cfg -> edit -> train -> pth_to_hf -> merge -> merged logits == adapter logits -> chat."""
import io
import json
from pathlib import Path

import pytest
import torch

from toolkit.checkpoint import load_checkpoint
from toolkit.cli.main import main

from cfg_edit import edit_config


def losses(work_dir: Path) -> list:
    scalars = next(work_dir.rglob("vis_data/scalars.json"))
    return [json.loads(line)["loss"] for line in scalars.read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("chain")
    assert main(["copy-cfg", "smollm2_135m_instruct_lora_champ_e3", str(root)]) == 0
    cfg = root / "smollm2_135m_instruct_lora_champ_e3_copy.py"
    edit_config(cfg, pretrained_model_name_or_path=tiny_llama_dir, max_length=128, drop_long_samples=False,
                lr=2e-3, save_steps=4)
    work_dir = root / "work"
    argv = ["train", str(cfg), "--work-dir", str(work_dir), "--cfg-options", "train_cfg.max_iters=8",
            "default_hooks.logger.interval=1"]
    assert main(argv) == 0
    return root, cfg, work_dir


def test_copy_cfg_never_overwrites(trained_lora, capsys):
    root, cfg, _ = trained_lora
    before = cfg.read_text()
    assert main(["copy-cfg", "smollm2_135m_instruct_lora_champ_e3", str(root)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cfg.read_text() == before


def test_train_writes_adapter_only_checkpoints_and_eval_answers(trained_lora):
    _, _, work_dir = trained_lora
    assert sorted(p.name for p in work_dir.glob("iter_*.pth")) == ["iter_4.pth", "iter_8.pth"]
    state = load_checkpoint(work_dir / "iter_8.pth")["state_dict"]  # weights_only=True
    assert state and all("lora_" in key for key in state)
    answers = [json.loads(line) for line in (work_dir / "eval_chat.jsonl").read_text().splitlines()]
    assert [a["tag"] for a in answers] == ["before training", "after training"]


def test_pth_to_hf_merge_and_chat(trained_lora, tiny_llama_dir, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    root, cfg, work_dir = trained_lora
    adapter, merged = root / "adapter", root / "merged"
    assert main(["convert", "pth_to_hf", str(cfg), str(work_dir / "iter_8.pth"), str(adapter)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tk_meta.json"} <= \
        {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "tk_meta.json").read_text())["template"] == "chatml"

    assert main(["convert", "merge", tiny_llama_dir, str(adapter), str(merged), "--device", "cpu"]) == 0
    assert (merged / "model.safetensors").is_file() and (merged / "tk_meta.json").is_file()

    probe = torch.tensor([[1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198, 36, 37, 38]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    base_logits = base(probe).logits
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b), "training did not move the adapter"
    with torch.no_grad():
        adapted = peft_model(probe).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(probe).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter changes the model...
    torch.testing.assert_close(merged_logits, adapted, atol=1e-5, rtol=0)  # ...and the merge keeps it exact

    capsys.readouterr()
    assert main(["convert", "merge", tiny_llama_dir, str(adapter), str(merged)]) == 2
    assert "is not empty" in capsys.readouterr().err

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nRESET\nWhat is 2+2?\nEXIT\n"))
    assert main(["chat", str(merged), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "(history cleared)" in out
    # After RESET the question is asked with no history: chat must print exactly the greedy reply that
    # the merged model gives to the training template's prompt (computed here independently).
    from transformers import AutoTokenizer
    from toolkit.data.encode import prompt_for_generation
    from toolkit.data.templates import get_template
    tok = AutoTokenizer.from_pretrained(merged)
    meta = json.loads((merged / "tk_meta.json").read_text())
    prompt = prompt_for_generation([{"role": "user", "content": "What is 2+2?"}], tok, get_template(meta["template"]),
                                   system=meta["system"])
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    new = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id)[0, len(prompt):]
    expected = tok.decode(new, skip_special_tokens=True).strip()
    assert expected, "the merged model generated no text"
    assert expected in out.split("(history cleared)")[1]


def test_full_finetune_loss_falls_on_real_data(tmp_path, tiny_llama_dir):
    assert main(["copy-cfg", "smollm2_135m_instruct_full_champ_e3", str(tmp_path)]) == 0
    cfg = tmp_path / "smollm2_135m_instruct_full_champ_e3_copy.py"
    edit_config(cfg, pretrained_model_name_or_path=tiny_llama_dir, max_length=128, drop_long_samples=False,
                lr=3e-3, save_steps=1000)
    work_dir = tmp_path / "work"
    assert main(["train", str(cfg), "--work-dir", str(work_dir), "--cfg-options", "train_cfg.max_iters=20",
                 "default_hooks.logger.interval=1"]) == 0
    curve = losses(work_dir)
    assert len(curve) == 20
    assert sum(curve[-3:]) / 3 < curve[0] - 1.0, curve
    out = tmp_path / "full_hf"
    assert main(["convert", "pth_to_hf", str(cfg), str(work_dir / "iter_20.pth"), str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


def test_config_in_its_work_dir_is_kept_and_the_resolved_dump_converts(tmp_path, tiny_llama_dir):
    """mmengine dumps the resolved config to work_dir/<config name>; a config that lives there must not be
    overwritten, and the dump (imports written as dotted names) must still work with pth_to_hf."""
    assert main(["copy-cfg", "smollm2_135m_instruct_lora_champ_e3", str(tmp_path)]) == 0
    cfg = tmp_path / "smollm2_135m_instruct_lora_champ_e3_copy.py"
    edit_config(cfg, pretrained_model_name_or_path=tiny_llama_dir, max_length=128, drop_long_samples=False,
                save_steps=2, val_size=0)
    original = cfg.read_text()
    assert main(["train", str(cfg), "--work-dir", str(tmp_path), "--cfg-options", "train_cfg.max_iters=2",
                 "custom_hooks=[]"]) == 0
    assert cfg.read_text() == original
    resolved = tmp_path / "smollm2_135m_instruct_lora_champ_e3_copy_resolved.py"
    assert "type='peft.LoraConfig'" in resolved.read_text()  # a dotted name, not the class
    out = tmp_path / "adapter"
    assert main(["convert", "pth_to_hf", str(resolved), str(tmp_path / "iter_2.pth"), str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_dumped_dtype_names_build_to_dtypes():
    import torch
    from transformers import BitsAndBytesConfig
    from toolkit.builder import build
    quant = build(dict(type="transformers.BitsAndBytesConfig", load_in_4bit=True,
                       bnb_4bit_compute_dtype="torch.bfloat16"))
    assert isinstance(quant, BitsAndBytesConfig) and quant.bnb_4bit_compute_dtype == torch.bfloat16
