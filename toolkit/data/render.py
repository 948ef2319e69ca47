"""Show a sample as text with the untrained part visibly marked (hooks and ``tk log-dataset``)."""
from .encode import IGNORE_INDEX


def render_masked(input_ids, labels, tokenizer, mark: str = "[no loss]") -> str:
    """The sample as text, each untrained stretch wrapped as ``[no loss]...[/no loss]``."""
    pieces, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(input_ids[start:i])
            pieces.append(f"{mark}{text}[/{mark[1:]}" if labels[start] == IGNORE_INDEX else text)
            start = i
    return "".join(pieces)
