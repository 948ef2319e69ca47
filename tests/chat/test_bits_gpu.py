"""`--bits 4|8` (bitsandbytes) on a CUDA GPU: tk chat with a small random llama, with and without a LoRA
adapter. Skipped without CUDA + bitsandbytes (CPU CI); run on a GPU machine:
`python -m pytest tests/chat/test_bits_gpu.py`."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                                reason="needs a CUDA GPU and bitsandbytes")


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    """A random llama (hidden 256) with a small ChatML word-level tokenizer, and a LoRA adapter for it."""
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp("bits")
    words = "hello hi again you are tiny system user assistant".split() + [f"w{i}" for i in range(200)]
    vocab = {w: i for i, w in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "\n", *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    (root / "base" / "tk_meta.json").write_text(json.dumps({"template": "chatml", "system": "you are tiny"}))
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(root / "adapter")
    return str(root / "base"), str(root / "adapter")


@pytest.mark.parametrize("bits, layer", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_quantized_chat_with_and_without_adapter(base_and_adapter, bits, layer):
    from toolkit.chat.loading import load_chat_model
    from toolkit.chat.session import ChatSession
    base, adapter = base_and_adapter
    replies = {}
    for with_adapter in (False, True):
        loaded = load_chat_model(base, adapter if with_adapter else None, bits=bits)
        kinds = {type(m).__name__ for m in loaded.model.modules()}
        assert layer in kinds and next(loaded.model.parameters()).is_cuda
        pieces = []
        session = ChatSession(loaded.model, loaded.tokenizer, loaded.template, loaded.system, max_new_tokens=8)
        replies[with_adapter] = session.ask("hello", on_text=pieces.append)
        assert pieces and session.usage["completion_tokens"] > 0
    assert replies[False] != replies[True]  # the adapter is applied on the quantized base

    run = subprocess.run([sys.executable, "-m", "toolkit.cli.main", "chat", base, "--adapter", adapter,
                          "--bits", str(bits), "--max-new-tokens", "6", "--no-streamer"],
                         input="hello\nRESET\nhi again\nEXIT\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[1] == "(history cleared)" and len(run.stdout.splitlines()) == 3
