"""Every shipped config loads and validates on CPU, even where its weights or data are absent."""
import pytest

from toolkit.cli.list_cfg import shipped_configs
from toolkit.config import load_config, validate_config

CONFIGS = shipped_configs()


def test_required_configs_ship():
    assert {"smollm2_135m_instruct_lora_champ_e3", "smollm2_135m_instruct_full_champ_e3",
            "internlm_chat_7b_qlora_math"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_loads_and_validates(name):
    cfg = load_config(name)
    validate_config(cfg)
    assert callable(cfg.model["type"]) and callable(cfg.train_dataloader["dataset"]["type"])


def test_qlora_config_is_nf4_double_quant_with_internlm_template():
    import torch
    cfg = load_config("internlm_chat_7b_qlora_math")
    quant = cfg.model.llm.quantization_config
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert cfg.train_dataloader.dataset.template == "internlm_chat"
    assert cfg.train_dataloader.dataset.map_fn == "math"


def test_list_cfg_pattern(capsys):
    from toolkit.cli.main import main
    assert main(["list-cfg", "-p", "QLORA"]) == 0
    assert capsys.readouterr().out.split() == ["internlm_chat_7b_qlora_math"]


def test_llama2_7b_full_config_trains_every_weight_compiled_with_a_fused_optimizer():
    cfg = load_config("llama2_7b_full_champ_e3")
    assert cfg.model.adapter is None and cfg.model.compile is True
    assert cfg.model.gradient_checkpointing is True and cfg.model.checkpoint_every == 1
    assert cfg.optim_wrapper.optimizer.fused is True and cfg.optim_wrapper.optimizer.lr == 2e-5
    assert "--deepspeed zero3" in (cfg.filename and open(cfg.filename).read())
