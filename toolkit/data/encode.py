"""Conversation -> input_ids + labels. The one place where label masking happens.

Only what the assistant says is trained: its reply, the template's SUFFIX and, where the SUFFIX is not
the end-of-sequence marker, the EOS token. System prompt, user turns, SEP and the assistant's header
(the end of INSTRUCTION) get the label ``IGNORE_INDEX``. An assistant message with ``"loss": False``
is kept as context but not trained.
"""
from __future__ import annotations

IGNORE_INDEX = -100


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of text by itself (llama does; SmolLM2 and Qwen do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def encode_conversation(messages: list, tokenizer, template: dict, max_length: int,
                        system: str | None = None) -> dict:
    """Encode one unified conversation.

    ``system`` is used when the conversation has no system message of its own. Returns
    ``{"input_ids": [...], "labels": [...], "num_trained": n}``, truncated to ``max_length``;
    ``num_trained`` is 0 when truncation (or ``loss: False`` everywhere) left nothing to learn.
    """
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, trained: bool) -> None:
        if not text:
            return
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))

    if tokenizer_adds_bos(tokenizer):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)

    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    pending = template.get("SYSTEM", "").format(system=system) if system else ""
    suffix = template.get("SUFFIX", "")
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":  # a later system message: put it before the next user turn
            pending += template.get("SYSTEM", "").format(system=content)
        elif role == "user":
            add(pending + template["INSTRUCTION"].format(input=content), trained=False)
            pending = ""
        else:  # assistant
            if pending:
                add(pending, trained=False)
                pending = ""
            trained = message.get("loss") is not False
            add(content + suffix, trained=trained)
            if not template.get("SUFFIX_AS_EOS", False) and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
                labels.append(tokenizer.eos_token_id if trained else IGNORE_INDEX)
            add(template.get("SEP", ""), trained=False)

    ids, labels = ids[:max_length], labels[:max_length]
    num_trained = sum(label != IGNORE_INDEX for label in labels)
    return {"input_ids": ids, "labels": labels, "num_trained": num_trained}


def prompt_for_generation(messages: list, tokenizer, template: dict, system: str | None = None) -> list:
    """Token ids of a conversation that ends with the user's turn: exactly the prompt the model saw in
    training before a reply (the INSTRUCTION ends where the assistant starts)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a generation prompt must end with a user message")
    return encode_conversation(messages, tokenizer, template, max_length=10**9, system=system)["input_ids"]
