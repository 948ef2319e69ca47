from ...registry import MAP_FNS
from .common import require_str


@MAP_FNS.register_module(name="text")
def text_map_fn(record: dict) -> dict:
    """Plain text for incremental pre-training (a ``text`` field, or ``%``-separated entries of a text file).

    Before: {"text": "A day for firm decisions!!!!!  Or is it?"}
    After:  {"messages": [{"role": "assistant", "content": "A day for firm decisions!!!!!  Or is it?"}]}
    Every token is trained; use it with ``template='pretrain'`` (text + EOS, no chat markup).
    """
    return {"messages": [{"role": "assistant", "content": require_str(record, "text")}]}
