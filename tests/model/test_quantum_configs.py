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
