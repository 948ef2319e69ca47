"""The batched encoder (all pieces of many conversations in one tokenizer call, pieces past max_length
skipped) gives exactly what a plain one-piece-at-a-time encoder gives, on real data and every template."""
import random

import pytest

from toolkit.data.dataset import apply_map_fn, resolve_map_fn
from toolkit.data.encode import IGNORE_INDEX, encode_conversations, tokenize_texts
from toolkit.data.sources import load_records
from toolkit.data.templates import PROMPT_TEMPLATES


def reference_encode(messages, tokenizer, template, max_length, system=None):
    """The walking skeleton's encoder: one tokenizer call per piece, appended in order."""
    ids, labels = [], []

    def add(text, trained):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))

    if tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    pending = template.get("SYSTEM", "").format(system=system) if system else ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            pending += template.get("SYSTEM", "").format(system=content)
        elif role == "user":
            if template.get("SYSTEM_IN_INPUT"):
                add(template["INSTRUCTION"].format(input=pending + content), False)
            else:
                add(pending + template["INSTRUCTION"].format(input=content), False)
            pending = ""
        else:
            add(pending, False)
            pending = ""
            trained = message.get("loss") is not False
            add(content + template.get("SUFFIX", ""), trained)
            if not template.get("SUFFIX_AS_EOS"):
                ids.append(tokenizer.eos_token_id)
                labels.append(tokenizer.eos_token_id if trained else IGNORE_INDEX)
            add(template.get("SEP", ""), False)
    return ids[:max_length], labels[:max_length]


def real_conversations():
    """CHAMP problems (packaged), plus multi-turn chats made by chaining them, with systems and loss flags."""
    singles = apply_map_fn(load_records("champ"), resolve_map_fn("champ"), "champ")[:24]
    rng = random.Random(0)
    chats = []
    for i in range(0, 24, 3):
        turns = [m for conversation in singles[i:i + rng.randint(1, 4)] for m in conversation]
        if i % 8 == 0:
            turns = [{"role": "system", "content": "Solve step by step."}] + turns
        if i % 12 == 0:
            turns[-1] = dict(turns[-1], loss=False)
        chats.append(turns)
    return singles + chats


@pytest.mark.parametrize("name", sorted(PROMPT_TEMPLATES))
def test_batched_equals_one_piece_at_a_time(tokenizer, name):
    conversations = real_conversations()
    template = PROMPT_TEMPLATES[name]
    reference = [reference_encode(m, tokenizer, template, 10**9, system="Be brief.") for m in conversations]
    for max_length in (64, 700, 100000):  # truncation in the first round, in a later round, none
        encoded = encode_conversations(conversations, tokenizer, template, max_length, system="Be brief.",
                                       progress=False)
        for i, (ids, labels) in enumerate(reference):
            ids, labels = ids[:max_length], labels[:max_length]
            sample = encoded.sample(i)
            assert sample["input_ids"] == ids and sample["labels"] == labels, (name, max_length, i)
            assert sample["num_trained"] == sum(label != IGNORE_INDEX for label in labels)


def test_fast_backend_path_equals_the_tokenizer_call(tokenizer):
    texts = [m["content"] for c in real_conversations() for m in c] + ["<|im_start|>user\nhi<|im_end|>", "  x \n\n"]
    assert tokenize_texts(tokenizer, texts, chunk=7) == tokenizer(texts, add_special_tokens=False)["input_ids"]
