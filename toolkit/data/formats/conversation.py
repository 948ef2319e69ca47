from ...registry import MAP_FNS
from .common import FormatError, require_list


@MAP_FNS.register_module(name="conversation")
def conversation_map_fn(record: dict) -> dict:
    """XTuner's own format: a ``conversation`` list of ``{system?, input, output, output_with_loss?}`` turns.

    Before: {"conversation": [{"system": "Be brief.", "input": "Hi", "output": "Hello!"},
                              {"input": "2+2?", "output": "4", "output_with_loss": false}]}
    After:  {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4", "loss": False}]}
    """
    messages = []
    for i, turn in enumerate(require_list(record, "conversation")):
        if not isinstance(turn, dict):
            raise FormatError(f"turn {i} must be an object with 'input' and 'output', got {type(turn).__name__}")
        for key in ("system", "input", "output"):
            if turn.get(key) is not None and not isinstance(turn[key], str):
                raise FormatError(f"turn {i}: field '{key}' must be a string, got {type(turn[key]).__name__}")
        if not turn.get("output"):
            raise FormatError(f"turn {i}: missing or empty field 'output'")
        if turn.get("system"):
            messages.append({"role": "system", "content": turn["system"]})
        messages.append({"role": "user", "content": turn.get("input") or ""})
        reply = {"role": "assistant", "content": turn["output"]}
        if turn.get("output_with_loss") is False:
            reply["loss"] = False
        messages.append(reply)
    return {"messages": messages}
