"""Precision, gradient checkpointing, accumulation and clipping settings reach training and do what they say."""
import pytest
import torch
from mmengine.config import Config

from toolkit.checkpoint import load_model_state
from toolkit.cli.main import main
from toolkit.config import load_config
from toolkit.engine.runner import adapt_to_device, drop_disabled_validation

from conftest import FAST


def wrapper_cfg(dtype):
    return Config(dict(optim_wrapper=dict(type="AmpOptimWrapper", dtype=dtype, loss_scale="dynamic",
                                          optimizer=dict(type="AdamW", lr=1e-3))))


@pytest.mark.parametrize("cuda, dtype, expected", [(False, "bfloat16", "OptimWrapper"), (True, None, "OptimWrapper"),
                                                   (True, "bfloat16", "AmpOptimWrapper"),
                                                   (True, "float16", "AmpOptimWrapper")])
def test_amp_dtype_picks_the_wrapper(monkeypatch, cuda, dtype, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = wrapper_cfg(dtype)
    adapt_to_device(cfg)
    assert cfg.optim_wrapper["type"] == expected
    assert cfg.optim_wrapper.get("dtype") == (dtype if expected == "AmpOptimWrapper" else None)


@pytest.mark.parametrize("adapter", [None, {"type": "LoraConfig"}])
def test_bf16_weights_full_finetune_use_the_plain_wrapper(monkeypatch, adapter):
    """AMP's gradient scaler cannot unscale bf16 gradients (it crashed 7B full fine-tuning on the H100)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = wrapper_cfg("bfloat16")
    cfg.model = dict(llm=dict(dtype="torch.bfloat16"), adapter=adapter)
    adapt_to_device(cfg)
    assert cfg.optim_wrapper["type"] == ("OptimWrapper" if adapter is None else "AmpOptimWrapper")


def test_fp16_weights_full_finetune_under_amp_is_refused(monkeypatch):
    from toolkit.errors import UserError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = wrapper_cfg("float16")
    cfg.model = dict(llm=dict(dtype="float16"), adapter=None)
    with pytest.raises(UserError, match="model.llm.dtype='float16'"):
        adapt_to_device(cfg)


def test_shipped_settings_are_wired():
    cfg = load_config("smollm2_135m_instruct_lora_champ_e3")
    assert cfg.model.gradient_checkpointing is cfg.gradient_checkpointing is False
    assert cfg.optim_wrapper.dtype == cfg.amp_dtype == "bfloat16"
    assert cfg.optim_wrapper.clip_grad.max_norm == cfg.max_norm
    assert cfg.param_scheduler.decay == cfg.lr_scheduler_type
    assert cfg.default_hooks.checkpoint.max_keep_ckpts == cfg.save_total_limit
    drop_disabled_validation(cfg)  # the shipped default holds 5% out: validation stays on
    assert cfg.val_dataloader.dataset.val_size == cfg.val_size == 0.05 and cfg.val_cfg is not None
    off = load_config("smollm2_135m_instruct_lora_champ_e3", {"val_dataloader.dataset.val_size": 0})
    drop_disabled_validation(off)  # val_size = 0 and no separate set: no validation
    assert off.val_dataloader is None and off.val_cfg is None and off.val_evaluator is None


def test_gradient_checkpointing_changes_memory_not_numbers(tiny_llama_dir):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from toolkit.model.sft import SupervisedFinetune
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100
    results = []
    for checkpointing in (False, True):
        llm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        torch.manual_seed(0)
        model = SupervisedFinetune(llm, LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
                                   gradient_checkpointing=checkpointing).train()
        assert model.llm.get_base_model().is_gradient_checkpointing is checkpointing
        loss = model(ids, labels)["loss"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=1e-6)
    assert len(grads_on) == len(grads_off) == 8
    for on, off in zip(grads_on, grads_off):
        torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-7)


def test_accumulation_steps_the_optimizer_every_n_iterations(tiny_config, tmp_path):
    """LoRA B starts at zero: it moves at the first optimizer step, which with accumulation 2 is iteration 2."""
    cfg = tiny_config(accumulative_counts=2, save_steps=1, save_total_limit=5)
    work_dir = tmp_path / "work"
    assert main(["train", str(cfg), "--work-dir", str(work_dir), "--cfg-options", "train_cfg.max_iters=4",
                 *FAST]) == 0

    def lora_b(iteration):
        state = load_model_state(work_dir / f"iter_{iteration}.pth")
        return torch.cat([v.flatten() for k, v in state.items() if "lora_B" in k])
    assert lora_b(1).abs().max() == 0
    assert lora_b(2).abs().max() > 0
    torch.testing.assert_close(lora_b(3), lora_b(2), rtol=0, atol=0)  # iteration 3 only accumulates
    assert not torch.equal(lora_b(4), lora_b(3))


def test_resume_from_a_missing_checkpoint_is_one_line(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "w"), "--resume", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such checkpoint" in err and "nope.pth" in err


def test_resume_auto_in_an_empty_work_dir_says_it_starts_fresh(tiny_config, tmp_path, monkeypatch):
    from toolkit.engine import runner
    said = []
    monkeypatch.setattr(runner, "print_log", lambda message, **kwargs: said.append(message))
    cfg = load_config(str(tiny_config()))
    runner.prepare(cfg, work_dir=str(tmp_path / "empty"), resume="auto")
    assert any("no checkpoint in" in line for line in said) and cfg.resume is False and cfg.load_from is None
    said.clear()
    (tmp_path / "empty").mkdir()  # a last_checkpoint naming a checkpoint that is not there: still a fresh start
    (tmp_path / "empty" / "last_checkpoint").write_text(str(tmp_path / "empty" / "iter_2.pth"))
    cfg = runner.prepare(load_config(str(tiny_config())), work_dir=str(tmp_path / "empty"), resume="auto")
    assert any("no checkpoint in" in line for line in said) and cfg.resume is False
