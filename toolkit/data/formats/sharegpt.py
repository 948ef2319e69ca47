from ...registry import MAP_FNS
from .common import FormatError, require_list

#: ShareGPT speaker names -> unified roles (``bing``/``bard``/``chatgpt`` occur in the public dumps).
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
            "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


@MAP_FNS.register_module(name="sharegpt")
def sharegpt_map_fn(record: dict) -> dict:
    """ShareGPT ``conversations`` of ``{"from", "value"}`` turns (also Qwen-VL style text, kept verbatim).

    Before: {"conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": "Picture 1: <img>a.jpg</img>\\nWhat is it?"},
                               {"from": "gpt", "value": "<ref>A cat</ref><box>(1,2),(3,4)</box>"}]}
    After:  {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Picture 1: <img>a.jpg</img>\\nWhat is it?"},
                          {"role": "assistant", "content": "<ref>A cat</ref><box>(1,2),(3,4)</box>"}]}
    Split dumps often start mid-chat with a reply that has no prompt: such leading replies are dropped,
    as is a last human turn with no reply. Consecutive turns of one speaker are joined with a blank line.
    """
    messages = []
    for i, turn in enumerate(require_list(record, "conversations")):
        if not isinstance(turn, dict):
            raise FormatError(f"turn {i} must be an object with 'from' and 'value', got {type(turn).__name__}")
        speaker, value = turn.get("from"), turn.get("value")
        if not isinstance(speaker, str) or speaker not in SPEAKERS:
            raise FormatError(f"turn {i} has 'from': {speaker!r}; expected one of {', '.join(SPEAKERS)}")
        if not isinstance(value, str):
            raise FormatError(f"turn {i} needs a string 'value', got {type(value).__name__}")
        role = SPEAKERS[speaker]
        if messages and messages[-1]["role"] == role and role != "system":
            messages[-1]["content"] += "\n\n" + value
        else:
            messages.append({"role": role, "content": value})
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    while rest and rest[0]["role"] == "assistant":
        rest.pop(0)
    while rest and rest[-1]["role"] == "user":
        rest.pop()
    if not any(m["role"] == "assistant" for m in rest):
        raise FormatError("the conversation has no reply that follows a prompt")
    return {"messages": system + rest}
