from ...registry import MAP_FNS
from .common import FormatError, require_str


@MAP_FNS.register_module(name="champ")
def champ_map_fn(record: dict) -> dict:
    """CHAMP competition math (``champ-dataset``, MIT): problem -> numbered steps + final answer.

    Before: {"problem": "How many strings ...?", "steps": ["Let x_n ...", "Thus ... 239 ..."],
             "answer": "239"}
    After:  {"messages": [{"role": "user", "content": "How many strings ...?"},
                          {"role": "assistant",
                           "content": "Step 1: Let x_n ...\\nStep 2: Thus ...\\nFinal answer: 239"}]}
    """
    problem = require_str(record, "problem")
    steps = record.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
        raise FormatError("field 'steps' must be a non-empty list of strings")
    lines = [f"Step {i}: {step.strip()}" for i, step in enumerate(steps, 1)]
    lines.append(f"Final answer: {require_str(record, 'answer').strip()}")
    return {"messages": [{"role": "user", "content": problem},
                         {"role": "assistant", "content": "\n".join(lines)}]}
