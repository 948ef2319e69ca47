"""Show a sample as text with the untrained part visibly marked (hooks and ``tk log-dataset``)."""
import itertools

from .encode import IGNORE_INDEX


def _decode(tokenizer, ids) -> str:
    """``tokenizer.decode``; a run of negative ids (a picture's placeholders, toolkit/multimodal) shows as
    ``[image: N tokens]``."""
    return "".join(f"[image: {len(run)} tokens]" if placeholder else tokenizer.decode(run)
                   for placeholder, group in itertools.groupby(ids, key=lambda t: t < 0) for run in [list(group)])


def render_masked(input_ids, labels, tokenizer, mark: str = "[no loss]") -> str:
    """The sample as text, each untrained stretch wrapped as ``[no loss]...[/no loss]``."""
    pieces, start = [], 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = _decode(tokenizer, input_ids[start:i])
            pieces.append(f"{mark}{text}[/{mark[1:]}" if labels[start] == IGNORE_INDEX else text)
            start = i
    return "".join(pieces)
