"""Shared fixtures: the real SmolLM2 (converted once per machine) and a tiny random llama that uses
SmolLM2's real tokenizer (hidden 64, 2 layers), so the whole chain runs in seconds on a CPU."""
import os
from pathlib import Path

import pytest

# Processed datasets go to a per-session cache; the converted embedded model is shared with the user's
# cache so it is made once per machine, not once per test run.
_USER_MODELS = (Path(os.environ["TK_CACHE"]).expanduser() if os.environ.get("TK_CACHE")
                else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tk") / "models"


@pytest.fixture(scope="session", autouse=True)
def tk_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("tk_cache")
    _USER_MODELS.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(_USER_MODELS, target_is_directory=True)
    os.environ["TK_CACHE"] = str(root)
    yield root


@pytest.fixture(scope="session")
def smollm2_dir(tk_cache):
    from toolkit.assets import resolve_model_path
    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    """A random llama (hidden 64, 2 layers) saved with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
