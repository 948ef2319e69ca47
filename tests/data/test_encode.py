"""Golden token ids and label masks with SmolLM2's real tokenizer."""
import pytest

from toolkit.data.encode import IGNORE_INDEX, encode_conversation, prompt_for_generation
from toolkit.data.templates import get_template

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
# <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n
# <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n
GOLDEN_IDS = [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198,
              19556, 17, 2, 198, 1, 4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198, 36, 2, 198]
X = IGNORE_INDEX
GOLDEN_LABELS = [X] * 18 + [19556, 17, 2] + [X] * 14 + [36, 2, X]


def test_chatml_two_turns_with_system_exact(tokenizer):
    encoded = encode_conversation(CONVERSATION, tokenizer, get_template("chatml"), max_length=512)
    assert encoded["input_ids"] == GOLDEN_IDS
    assert encoded["labels"] == GOLDEN_LABELS
    assert encoded["num_trained"] == 5


def test_chatml_equals_the_tokenizers_own_chat_template(tokenizer):
    reference = tokenizer.apply_chat_template(CONVERSATION, tokenize=True)
    reference = reference["input_ids"] if hasattr(reference, "keys") else reference
    assert encode_conversation(CONVERSATION, tokenizer, get_template("chatml"), 512)["input_ids"] == reference


def test_default_system_applies_only_without_one(tokenizer):
    no_system = CONVERSATION[1:3]
    with_default = encode_conversation(no_system, tokenizer, get_template("chatml"), 512, system="Be brief.")
    assert with_default["input_ids"] == GOLDEN_IDS[:22]
    own = encode_conversation(CONVERSATION[:3], tokenizer, get_template("chatml"), 512, system="Ignored.")
    assert own["input_ids"] == GOLDEN_IDS[:22]


def test_loss_false_keeps_reply_as_context_only(tokenizer):
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["loss"] = False
    encoded = encode_conversation(messages, tokenizer, get_template("chatml"), 512)
    assert encoded["input_ids"] == GOLDEN_IDS
    assert encoded["labels"] == [X] * 35 + [36, 2, X]


def test_eos_appended_and_trained_when_suffix_is_not_eos(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    encoded = encode_conversation(messages, tokenizer, get_template("alpaca"), 512)
    reply = tokenizer("Hello!", add_special_tokens=False)["input_ids"]
    trained = [t for t in encoded["labels"] if t != X]
    assert trained == reply + [tokenizer.eos_token_id]


def test_truncation_counts_trained_tokens(tokenizer):
    encoded = encode_conversation(CONVERSATION, tokenizer, get_template("chatml"), max_length=19)
    assert encoded["input_ids"] == GOLDEN_IDS[:19] and encoded["num_trained"] == 1
    assert encode_conversation(CONVERSATION, tokenizer, get_template("chatml"), max_length=18)["num_trained"] == 0


def test_generation_prompt_is_the_training_prefix(tokenizer):
    prompt = prompt_for_generation(CONVERSATION[:4], tokenizer, get_template("chatml"))
    assert prompt == GOLDEN_IDS[:35]
    with pytest.raises(ValueError):
        prompt_for_generation(CONVERSATION[:3], tokenizer, get_template("chatml"))
