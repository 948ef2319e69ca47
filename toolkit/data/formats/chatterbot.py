from ...registry import MAP_FNS
from .common import FormatError, require_list


@MAP_FNS.register_module(name="chatterbot")
def chatterbot_map_fn(record: dict) -> dict:
    """chatterbot-corpus YAML dialogs: statements that alternate question and answer (28 languages).

    Before: {"dialog": ["你好", "嗨"], "categories": ["greetings"]}
    After:  {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗨"}]}
    A dialog of three or more lines alternates user / assistant; a last unanswered line is dropped.
    """
    lines = require_list(record, "dialog")
    if not all(isinstance(line, str) for line in lines):
        bad = next(line for line in lines if not isinstance(line, str))
        raise FormatError(f"field 'dialog' must be a list of strings, found {type(bad).__name__}")
    if len(lines) < 2:
        raise FormatError("a dialog needs at least a question and an answer")
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": line} for i, line in enumerate(lines)]
    return {"messages": messages[: len(messages) // 2 * 2]}
