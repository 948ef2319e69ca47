from ...registry import MAP_FNS
from .common import require_str


@MAP_FNS.register_module(name="math")
def math_map_fn(record: dict) -> dict:
    """The MATH dataset (Hendrycks et al.): one JSON file per problem with ``problem`` and ``solution``.

    Before: {"problem": "What is $1+1$?", "level": "Level 1", "type": "Algebra",
             "solution": "We have $1+1=\\\\boxed{2}$."}
    After:  {"messages": [{"role": "user", "content": "What is $1+1$?"},
                          {"role": "assistant", "content": "We have $1+1=\\\\boxed{2}$."}]}
    """
    return {"messages": [{"role": "user", "content": require_str(record, "problem")},
                         {"role": "assistant", "content": require_str(record, "solution")}]}
