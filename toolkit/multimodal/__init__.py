"""Multimodal fine-tuning, LLaVA-style: a vision encoder, an MLP projector and a causal LM.

data.py turns image conversations into samples, model.py trains the composition, export.py writes and
loads it, chat.py lets a chat session show it pictures. Importing the package registers the packaged
emoji sources (emoji.py).
"""
from . import emoji  # noqa: F401  (registers the 'emoji-*' data sources)
