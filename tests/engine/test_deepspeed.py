"""--deepspeed / --strategy fsdp: presets, "auto" filled from the config, the FlexibleRunner config."""
import copy
import json

import pytest
from mmengine.config import Config

from toolkit.cli.main import main
from toolkit.config import load_config
from toolkit.engine.strategy import (PRESETS, apply_strategy, check_flags, deepspeed_json, fill_auto,
                                     load_zero_checkpoint, use_deepspeed, use_fsdp)
from toolkit.errors import UserError

LORA = "smollm2_135m_instruct_lora_champ_e3"


@pytest.fixture
def cfg():
    return load_config(LORA)


def _autos(node):
    return [k for k, v in node.items() if v == "auto"] + \
        [k for v in node.values() if isinstance(v, dict) for k in _autos(v)]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_fills_completely(name, cfg):
    ds = deepspeed_json(name)
    assert _autos(ds), "presets leave batch/precision settings to the config"
    filled = fill_auto(ds, cfg)
    assert not _autos(filled)
    assert filled["train_micro_batch_size_per_gpu"] == 4       # batch_size in the config
    assert filled["gradient_accumulation_steps"] == 1
    assert filled["gradient_clipping"] == 1.0                  # clip_grad.max_norm
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False  # AmpOptimWrapper bf16
    assert filled["communication_data_type"] == "bf16"
    assert filled["zero_optimization"]["stage"] == int(name[4])
    assert ("offload_optimizer" in filled["zero_optimization"]) == name.endswith("offload")


def test_fill_follows_the_config(cfg):
    cfg.optim_wrapper.accumulative_counts = 8
    cfg.optim_wrapper.dtype = "float16"
    cfg.optim_wrapper.clip_grad = None
    cfg.train_dataloader.batch_size = 2
    filled = fill_auto(deepspeed_json("zero2"), cfg)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"]) == (2, 8)
    assert filled["gradient_clipping"] == 0.0
    assert filled["fp16"]["enabled"] is True and filled["bf16"]["enabled"] is False
    assert filled["communication_data_type"] == "fp16"
    cfg.optim_wrapper.type = "OptimWrapper"  # fp32 training: neither half precision
    filled = fill_auto(deepspeed_json("zero2"), cfg)
    assert filled["fp16"]["enabled"] is False and filled["bf16"]["enabled"] is False
    assert filled["communication_data_type"] == "fp32"


def test_bf16_weights_reduce_their_gradients_in_bf16():
    """Full fine-tuning of weights loaded in bf16 runs the plain wrapper (DeepSpeed's bf16 mode off), and its
    bf16 gradients go through the reduce-scatter in bf16, not cast to fp32; fp32 weights stay fp32."""
    from toolkit.engine.runner import adapt_to_device
    full = load_config("smollm2_135m_instruct_full_champ_e3")
    full.model.llm.dtype = "bfloat16"
    adapt_to_device(full)
    assert full.optim_wrapper.type == "OptimWrapper"
    filled = fill_auto(deepspeed_json("zero3"), full)
    assert filled["bf16"]["enabled"] is False and filled["communication_data_type"] == "bf16"
    full = load_config("smollm2_135m_instruct_full_champ_e3")
    full.model.llm.dtype = "bf16"  # the short name load_causal_lm takes too
    adapt_to_device(full)
    assert fill_auto(deepspeed_json("zero3"), full)["communication_data_type"] == "bf16"
    full = load_config("smollm2_135m_instruct_full_champ_e3")
    full.optim_wrapper.type = "OptimWrapper"  # fp32 weights (the config's), fp32 training
    assert fill_auto(deepspeed_json("zero3"), full)["communication_data_type"] == "fp32"


def test_communication_type_follows_the_json_precision(cfg, tmp_path):
    """A user's JSON that switches bf16 off keeps fp32 gradients (the LoRA config's AMP would say bf16), and one
    that switches it on reduces in bf16 under a config that trains in fp32."""
    own = tmp_path / "mine.json"
    for enabled, wrapper, expected in ((False, "AmpOptimWrapper", "fp32"), (True, "OptimWrapper", "bf16")):
        own.write_text(json.dumps({"bf16": {"enabled": enabled}, "communication_data_type": "auto",
                                   "zero_optimization": {"stage": 3}}))
        cfg.optim_wrapper.type = wrapper
        assert fill_auto(deepspeed_json(str(own)), cfg)["communication_data_type"] == expected, (enabled, wrapper)


def test_user_json_keeps_its_values_and_rejects_unknown_auto(cfg, tmp_path):
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": "auto",
                               "bf16": {}, "zero_optimization": {"stage": 2}}))
    filled = fill_auto(deepspeed_json(str(own)), cfg)
    assert filled["train_micro_batch_size_per_gpu"] == 3  # a written value wins
    assert filled["bf16"] == {"enabled": True}            # a section without "enabled" follows the config
    own.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    with pytest.raises(UserError, match="zero_optimization.reduce_bucket_size"):
        fill_auto(deepspeed_json(str(own)), cfg)


def test_bad_deepspeed_arguments(tmp_path):
    with pytest.raises(UserError, match="neither a preset"):
        deepspeed_json("zero4")
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": 1,\n "b": }')
    with pytest.raises(UserError, match=r"broken.json:2: not valid JSON"):
        deepspeed_json(str(broken))
    with pytest.raises(UserError, match="DeepSpeed model states"):
        load_zero_checkpoint(tmp_path)


def test_a_bad_norm_switch_stops_before_the_workers_start(monkeypatch):
    monkeypatch.setenv("TK_ZERO_NORM", "fp16")
    with pytest.raises(UserError, match="TK_ZERO_NORM='fp16' must be 'fp32'"):
        check_flags(deepspeed="zero3")
    check_flags()  # without --deepspeed the switch is not read


def test_use_deepspeed_builds_a_flexible_runner_config(cfg):
    optimizer = cfg.optim_wrapper.optimizer
    ds = use_deepspeed(cfg, "zero3")
    assert cfg.runner_type == "FlexibleRunner"
    assert cfg.strategy.type == "DeepSpeedStrategy" and cfg.strategy.config == ds
    assert cfg.optim_wrapper == dict(type="DeepSpeedOptimWrapper", optimizer=optimizer)
    assert Config(cfg.to_dict()).strategy.config["zero_optimization"]["stage"] == 3


def test_zero3_with_compiled_blocks_keeps_torch_linear(cfg, tmp_path, monkeypatch):
    """ZeRO-3 + compile=True on CUDA: memory_efficient_linear off (DeepSpeed's linear would break each
    whole-fetched block's graph at every projection); not for ZeRO-2, uncompiled models, no CUDA (nothing
    compiles), tk's circuit adapters, offload_activations, 4/8-bit models, a user's explicit value, or
    TK_ZERO3_FETCH=module;
    a bad switch value is one line."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "memory_efficient_linear" not in use_deepspeed(cfg.copy(), "zero3")["zero_optimization"]
    cfg.model.compile = True
    assert use_deepspeed(cfg.copy(), "zero3")["zero_optimization"]["memory_efficient_linear"] is False
    assert "memory_efficient_linear" not in use_deepspeed(cfg.copy(), "zero2")["zero_optimization"]
    for change in (dict(adapter=dict(type="vqc", n_qubits=4)), dict(offload_activations=True),
                   dict(llm=dict(cfg.model.llm, quantization_config=dict(load_in_4bit=True)))):
        other = copy.deepcopy(cfg)
        other.model.update(change)
        assert "memory_efficient_linear" not in use_deepspeed(other, "zero3")["zero_optimization"], change
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "memory_efficient_linear" not in use_deepspeed(cfg.copy(), "zero3")["zero_optimization"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    user = deepspeed_json("zero3")
    user["zero_optimization"]["memory_efficient_linear"] = True
    (tmp_path / "mine.json").write_text(json.dumps(user))
    assert use_deepspeed(cfg.copy(), str(tmp_path / "mine.json"))["zero_optimization"]["memory_efficient_linear"]
    monkeypatch.setenv("TK_ZERO3_FETCH", "module")
    assert "memory_efficient_linear" not in use_deepspeed(cfg.copy(), "zero3")["zero_optimization"]
    monkeypatch.setenv("TK_ZERO3_FETCH", "blocks")
    with pytest.raises(UserError, match="TK_ZERO3_FETCH='blocks' must be 'block'"):
        use_deepspeed(cfg.copy(), "zero3")


LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5)


def test_zero3_auto_prefetch_holds_a_whole_block(cfg, tmp_path, monkeypatch):
    """The preset's "auto" prefetch bucket: with whole-block fetch (compiled, CUDA) it holds one block (a 7B
    llama's 202,383,360 parameters, counted from config.json alone: the folder has no weights); otherwise it is
    DeepSpeed's 5e7; a user's number stays; a config naming no path, a broken config.json or a hub id (nothing
    local to count) fall back to 5e7 with a warning, leaving the error to the model's loading."""
    import torch
    folder = tmp_path / "llama7b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_7B))
    cfg.model.llm.path = str(folder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    zero = use_deepspeed(cfg.copy(), "zero3")["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 50_000_000
    cfg.model.compile = True
    zero = use_deepspeed(cfg.copy(), "zero3")["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 202_383_360
    monkeypatch.setenv("TK_ZERO3_FETCH", "module")  # per-linear fetch: as before
    zero = use_deepspeed(cfg.copy(), "zero3")["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 50_000_000
    monkeypatch.delenv("TK_ZERO3_FETCH")
    user = deepspeed_json("zero3")
    user["zero_optimization"]["stage3_prefetch_bucket_size"] = 12345
    (tmp_path / "mine.json").write_text(json.dumps(user))
    zero = use_deepspeed(cfg.copy(), str(tmp_path / "mine.json"))["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == 12345
    small = load_config(LORA)  # the embedded SmolLM2-135M: its blocks (3.5M) are under DeepSpeed's default
    small.model.compile = True
    assert use_deepspeed(small, "zero3")["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000
    pathless = copy.deepcopy(cfg)
    pathless.model.llm = dict(type="my_loader")
    assert use_deepspeed(pathless, "zero3")["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000
    for broken in ("{", None):  # unreadable, or no local folder (a hub id): DeepSpeed's default and a warning;
        if broken:              # loading the model reports what is wrong with it
            (folder / "config.json").write_text(broken)
        else:
            cfg.model.llm.path = "some-org/some-model"
        assert use_deepspeed(cfg.copy(), "zero3")["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000


def test_use_fsdp(cfg, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="fsdp needs CUDA"):
        use_fsdp(cfg)
    import mmengine.logging
    warnings = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mmengine.logging, "print_log", lambda msg, **kw: warnings.append(msg))
    use_fsdp(cfg)
    assert "clipping is off" in warnings[0]  # the config clips; mmengine's FSDP glue cannot
    assert cfg.runner_type == "FlexibleRunner" and cfg.strategy.type == "FSDPStrategy"
    assert cfg.strategy.model_wrapper.mixed_precision.param_dtype == "bfloat16"
    assert cfg.strategy.state_dict_cfg == "full"  # checkpoints convert like single-GPU ones
    assert cfg.optim_wrapper.type == "OptimWrapper" and "clip_grad" not in cfg.optim_wrapper


def test_strategies_exclude_each_other(cfg):
    with pytest.raises(UserError, match="exclude each other"):
        apply_strategy(cfg, deepspeed="zero2", strategy="fsdp")


def test_cli_rejects_unknown_preset_in_one_line(capsys):
    assert main(["train", LORA, "--deepspeed", "zero9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "zero9" in err and "zero2_offload" in err
