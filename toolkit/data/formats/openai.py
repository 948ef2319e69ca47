from ...registry import MAP_FNS
from .common import FormatError, check_messages


@MAP_FNS.register_module(name="openai")
def openai_map_fn(record: dict) -> dict:
    """OpenAI chat ``messages`` (the fine-tuning API's JSONL), kept as they are after checking.

    Before: {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!", "loss": false}, ...]}
    After:  the same list; ``"loss": false`` keeps that assistant message out of training.
    """
    if "messages" not in record:
        raise FormatError("missing field 'messages'")
    messages = check_messages(record["messages"])
    out = []
    for message in messages:
        kept = {"role": message["role"], "content": message["content"]}
        if "loss" in message and message["loss"] is not None:
            if not isinstance(message["loss"], bool):
                raise FormatError(f"'loss' must be true or false, got {message['loss']!r}")
            kept["loss"] = message["loss"]
        out.append(kept)
    return {"messages": out}
