"""template='auto': the tokenizer's own chat template, token for token, labels exactly on the replies."""
import pytest

from toolkit.data.encode import IGNORE_INDEX, encode_conversation, encode_conversations, prompt_for_generation
from toolkit.data.templates import get_template

TWO_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
CONVERSATIONS = [
    TWO_TURNS,
    TWO_TURNS[1:3],  # no system: SmolLM2's template adds its own default system prompt
    [{"role": "user", "content": "Liste trois couleurs."},
     {"role": "assistant", "content": "Rouge, vert\n\net bleu.\n"},
     {"role": "user", "content": "翻译成英文：猫"}, {"role": "assistant", "content": "cat"},
     {"role": "user", "content": "  spaces  "}, {"role": "assistant", "content": "```python\nprint(1)\n```"}],
]


def chat_template_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_auto_equals_apply_chat_template(tokenizer, messages):
    encoded = encode_conversation(messages, tokenizer, get_template("auto"), max_length=4096)
    assert encoded["input_ids"] == chat_template_ids(tokenizer, messages)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_auto_labels_are_exactly_the_replies(tokenizer, messages):
    encoded = encode_conversation(messages, tokenizer, get_template("auto"), max_length=4096)
    ids, labels = encoded["input_ids"], encoded["labels"]
    expected = [IGNORE_INDEX] * len(ids)
    for k, message in enumerate(messages):  # each reply + <|im_end|>, found by rendering the prefixes
        if message["role"] == "assistant":
            start = len(chat_template_ids(tokenizer, messages[:k], add_generation_prompt=True))
            reply = tokenizer(message["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            assert ids[start:start + len(reply)] == reply
            expected[start:start + len(reply)] = reply
    assert labels == expected


def test_auto_matches_the_named_chatml_template_on_smollm2(tokenizer):
    auto = encode_conversation(TWO_TURNS, tokenizer, get_template("auto"), max_length=4096)
    named = encode_conversation(TWO_TURNS, tokenizer, get_template("chatml"), max_length=4096)
    assert auto == named


def test_auto_loss_false_and_truncation(tokenizer):
    messages = [dict(m) for m in TWO_TURNS]
    messages[2]["loss"] = False
    auto = encode_conversations([messages, TWO_TURNS], tokenizer, get_template("auto"), max_length=19)
    named = encode_conversations([messages, TWO_TURNS], tokenizer, get_template("chatml"), max_length=19)
    assert [auto.sample(i) for i in range(2)] == [named.sample(i) for i in range(2)]
    assert auto.sample(0)["num_trained"] == 0 and auto.sample(1)["num_trained"] == 1


def test_auto_generation_prompt_is_the_training_prefix(tokenizer):
    prompt = prompt_for_generation(TWO_TURNS[:4], tokenizer, get_template("auto"))
    assert prompt == chat_template_ids(tokenizer, TWO_TURNS[:4], add_generation_prompt=True)
    full = encode_conversation(TWO_TURNS, tokenizer, get_template("auto"), max_length=4096)["input_ids"]
    assert full[:len(prompt)] == prompt
