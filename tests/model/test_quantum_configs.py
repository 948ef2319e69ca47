"""The quantum-adapter configs are the LoRA config with only the adapter block changed, so they stay in sync."""
import re

import pytest

from toolkit.paths import configs_root
from toolkit.config import load_config

LORA = "smollm2_135m_instruct_lora_champ_e3"


def _without_adapter(text: str) -> str:
    text = re.sub(r"\n    (# .*\n    )*adapter=dict\(.*?\)\)\n", "\n", text, flags=re.S)
    return text.split('"""', 2)[2].replace("from peft import LoraConfig\n", "")


@pytest.mark.parametrize("kind", ["vqc", "tq", "quanta"])
def test_quantum_config_differs_from_lora_only_in_adapter(kind):
    name = f"smollm2_135m_instruct_{kind}_champ_e3"
    paths = {p.stem: p for p in configs_root().rglob("*.py")}
    assert _without_adapter(paths[name].read_text()) == _without_adapter(paths[LORA].read_text())
    adapter = load_config(name).model.adapter
    assert adapter.type == kind and list(adapter.target_modules) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("kind,expected", [("vqc", 8_392_704), ("tq", 4_200_448), ("quanta", 64 * 43_008)])
def test_llama2_7b_configs_give_the_stated_parameter_counts(kind, expected):
    """The 7B configs' adapters on a Llama-2-7B shape built on the meta device (no weights needed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolkit.model.adapters import apply_adapter
    cfg = load_config(f"llama2_7b_{kind}_champ_e3")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32, vocab_size=32000))
    model = apply_adapter(model, cfg.model.adapter)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert f"{expected:,}" in (configs_root() / "llama" / "llama2_7b" / f"llama2_7b_{kind}_champ_e3.py").read_text()
