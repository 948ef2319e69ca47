from ...registry import MAP_FNS
from .common import FormatError, require_str


@MAP_FNS.register_module(name="alpaca")
def alpaca_map_fn(record: dict) -> dict:
    """Alpaca instruction data (also Chinese alpaca-style files).

    Before: {"instruction": "Translate to French", "input": "cat", "output": "chat"}
    After:  {"messages": [{"role": "user", "content": "Translate to French\\ncat"},
                          {"role": "assistant", "content": "chat"}]}
    An empty or missing ``input`` leaves the instruction alone.
    """
    instruction = require_str(record, "instruction")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise FormatError(f"field 'input' must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": require_str(record, "output")}]}
