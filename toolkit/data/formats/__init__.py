"""Format map fns: one file each, every one turning a raw record into ``{"messages": [...]}``.

The unified record is OpenAI-style: a list of ``{"role": "system"|"user"|"assistant", "content": str}``,
where an assistant message may carry ``"loss": False`` to keep it out of training.
"""
from . import alpaca, champ, chatterbot, conversation, math, openai, sharegpt, text  # noqa: F401  (registers)
from .common import FormatError, check_messages

__all__ = ["FormatError", "check_messages"]
