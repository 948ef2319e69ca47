"""A multi-turn chat with a causal LM using the same template and masking rules as training."""
from __future__ import annotations

from typing import Callable

import torch
from transformers import TextStreamer

from ..data.encode import prompt_for_generation
from ..data.templates import get_template


class _CallbackStreamer(TextStreamer):
    """Hands each finished piece of decoded text to a callback instead of printing it."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self._on_text(text)


class ChatSession:
    """History + template + generation settings. ``ask`` returns the reply and streams it if asked."""

    def __init__(self, model, tokenizer, template="chatml", system: str | None = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0):
        self.model, self.tokenizer = model, tokenizer
        self.template = get_template(template)
        self.system = system
        self.generation = dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        if temperature and temperature > 0:
            self.generation.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            self.generation.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        self.history: list = []

    def reset(self) -> None:
        self.history = []

    def stop_words(self) -> list:
        return list(self.template.get("STOP_WORDS", []))

    def _stop_token_ids(self) -> list:
        ids = {self.tokenizer.eos_token_id} - {None}
        for word in self.stop_words():
            piece = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(piece) == 1:
                ids.add(piece[0])
        return sorted(ids)

    @torch.no_grad()
    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        messages = self.history + [{"role": "user", "content": text}]
        prompt = prompt_for_generation(messages, self.tokenizer, self.template, system=self.system)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([prompt], device=device)
        was_training = self.model.training
        self.model.eval()
        streamer = _CallbackStreamer(self.tokenizer, on_text) if on_text else None
        stop_strings = [w for w in self.stop_words() if len(self.tokenizer(w, add_special_tokens=False)["input_ids"]) > 1]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        try:
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                eos_token_id=self._stop_token_ids(), pad_token_id=pad, use_cache=True,
                stop_strings=stop_strings or None, tokenizer=self.tokenizer if stop_strings else None,
                **self.generation)
        finally:
            self.model.train(was_training)
        reply = self.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
        for word in self.stop_words():
            reply = reply.split(word)[0]
        reply = reply.strip()
        self.history = messages + [{"role": "assistant", "content": reply}]
        return reply
