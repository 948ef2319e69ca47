"""Prompt templates: a table of data, no logic (the encoder in encode.py is the one place that reads it).

Fields of a template (XTuner's, plus SYSTEM_IN_INPUT):
  SYSTEM       text put before the first user turn when there is a system prompt; ``{system}`` is filled
  SYSTEM_IN_INPUT  True for models without a system turn (llama2, mistral, gemma): the filled SYSTEM goes
               inside the first user turn, in front of its text
  INSTRUCTION  text around every user turn; ``{input}`` is filled; ends where the assistant starts
  SUFFIX       appended to every assistant reply and trained with it (the end-of-turn marker)
  SUFFIX_AS_EOS  True when SUFFIX already ends the reply for generation; otherwise the tokenizer's EOS
               token is appended (and trained) after SUFFIX, so the model learns to stop
  SEP          put after each reply, before the next prompt (not trained)
  STOP_WORDS   strings that end generation at chat time

The special tokens are each model's own (``<|eot_id|>`` for llama3, ``<end_of_turn>`` for gemma, ...);
BOS comes from the tokenizer, as the model's tokenizer adds it. ``template='auto'`` uses the tokenizer's
own Jinja chat template instead (see ``encode.encode_with_chat_template``).
"""
from ..errors import UserError

FIELDS = {"SYSTEM", "SYSTEM_IN_INPUT", "INSTRUCTION", "SUFFIX", "SUFFIX_AS_EOS", "SEP", "STOP_WORDS"}

_CHATML = dict(
    SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
    INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
    SUFFIX="<|im_end|>",
    SUFFIX_AS_EOS=True,
    SEP="\n",
    STOP_WORDS=["<|im_end|>"])

PROMPT_TEMPLATES = {
    "default": dict(
        SYSTEM="<|System|>:{system}\n",
        INSTRUCTION="<|User|>:{input}\n<|Bot|>:",
        SEP="\n"),
    "alpaca": dict(
        SYSTEM="{system}\n\n",
        INSTRUCTION="### Instruction:\n{input}\n\n### Response:\n",
        SEP="\n\n"),
    "vicuna": dict(  # FastChat's vicuna_v1.1: "{system} USER: {u} ASSISTANT: {a}</s>USER: ..."
        SYSTEM="{system} ",
        INSTRUCTION="USER: {input} ASSISTANT:"),
    "chatml": _CHATML,
    "qwen_chat": dict(_CHATML, STOP_WORDS=["<|im_end|>", "<|endoftext|>"]),
    "internlm_chat": dict(
        SYSTEM="<|System|>:{system}\n",
        INSTRUCTION="<|User|>:{input}<eoh>\n<|Bot|>:",
        SUFFIX="<eoa>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<eoa>"]),
    "internlm2_chat": _CHATML,
    "llama2_chat": dict(  # "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{u} [/INST] {a} </s><s>[INST] ..."
        SYSTEM="<<SYS>>\n{system}\n<</SYS>>\n\n",
        SYSTEM_IN_INPUT=True,
        INSTRUCTION="[INST] {input} [/INST]",
        SEP="<s>"),
    "llama3_chat": dict(
        SYSTEM="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        INSTRUCTION="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n",
        SUFFIX="<|eot_id|>",
        SUFFIX_AS_EOS=True,
        STOP_WORDS=["<|eot_id|>"]),
    "mistral": dict(  # "[INST] {system}\n\n{u} [/INST]{a}</s>[INST] ..."
        SYSTEM="{system}\n\n",
        SYSTEM_IN_INPUT=True,
        INSTRUCTION="[INST] {input} [/INST]"),
    "gemma": dict(  # gemma has no system turn: its template puts the system text in the first user turn
        SYSTEM="{system}\n\n",
        SYSTEM_IN_INPUT=True,
        INSTRUCTION="<start_of_turn>user\n{input}<end_of_turn>\n<start_of_turn>model\n",
        SUFFIX="<end_of_turn>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<end_of_turn>"]),
    "deepseek": dict(  # deepseek-llm / v2 chat: "{system}\n\nUser: {u}\n\nAssistant: {a}<｜end▁of▁sentence｜>"
        SYSTEM="{system}\n\n",
        INSTRUCTION="User: {input}\n\nAssistant: ",
        SUFFIX="<｜end▁of▁sentence｜>",
        SUFFIX_AS_EOS=True,
        STOP_WORDS=["<｜end▁of▁sentence｜>"]),
    "phi3": dict(
        SYSTEM="<|system|>\n{system}<|end|>\n",
        INSTRUCTION="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        SUFFIX="<|end|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<|end|>", "<|endoftext|>"]),
    "zephyr": dict(
        SYSTEM="<|system|>\n{system}</s>\n",
        INSTRUCTION="<|user|>\n{input}</s>\n<|assistant|>\n",
        SUFFIX="</s>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["</s>"]),
    "pretrain": dict(  # plain text (format 'text'): every token trained, EOS after each document
        INSTRUCTION="{input}"),
}

#: ``template='auto'``: render with the tokenizer's own chat template (``apply_chat_template``).
AUTO_TEMPLATE = {"AUTO": True}


def is_auto(template: dict) -> bool:
    return bool(template.get("AUTO"))


def get_template(name_or_dict) -> dict:
    """A template by name, ``'auto'``, or a user's own dict with the same fields."""
    if isinstance(name_or_dict, dict):
        unknown = set(name_or_dict) - FIELDS
        if unknown or "INSTRUCTION" not in name_or_dict:
            raise UserError(f"a custom template needs INSTRUCTION and only the known fields "
                            f"({', '.join(sorted(FIELDS))}); got unknown fields {sorted(unknown)}")
        return dict(name_or_dict)
    if name_or_dict == "auto":
        return AUTO_TEMPLATE
    if name_or_dict not in PROMPT_TEMPLATES:
        raise UserError(f"unknown prompt template {name_or_dict!r}; choose one of: "
                        f"{', '.join(sorted(PROMPT_TEMPLATES))}, auto")
    return PROMPT_TEMPLATES[name_or_dict]
