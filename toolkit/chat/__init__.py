"""One chat session (template, history, stop words, streaming) shared by the CLI, the web page and hooks."""
from .session import ChatSession

__all__ = ["ChatSession"]
