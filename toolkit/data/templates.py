"""Prompt templates: a table of data, no logic (the encoder in encode.py is the one place that reads it).

Fields of a template:
  SYSTEM       text put before the first user turn when there is a system prompt; ``{system}`` is filled
  INSTRUCTION  text around every user turn; ``{input}`` is filled; ends where the assistant starts
  SUFFIX       appended to every assistant reply and trained with it (the end-of-turn marker)
  SUFFIX_AS_EOS  True when SUFFIX already ends the reply for generation; otherwise the tokenizer's EOS
               token is appended (and trained) after SUFFIX, so the model learns to stop
  SEP          put after each reply, before the next prompt (not trained)
  STOP_WORDS   strings that end generation at chat time
"""
from ..errors import UserError

PROMPT_TEMPLATES = {
    "default": dict(
        SYSTEM="<|System|>:{system}\n",
        INSTRUCTION="<|User|>:{input}\n<|Bot|>:",
        SEP="\n"),
    "alpaca": dict(
        SYSTEM="{system}\n\n",
        INSTRUCTION="### Instruction:\n{input}\n\n### Response:\n",
        SEP="\n\n"),
    "chatml": dict(
        SYSTEM="<|im_start|>system\n{system}<|im_end|>\n",
        INSTRUCTION="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        SUFFIX="<|im_end|>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<|im_end|>"]),
    "internlm_chat": dict(
        SYSTEM="<|System|>:{system}\n",
        INSTRUCTION="<|User|>:{input}<eoh>\n<|Bot|>:",
        SUFFIX="<eoa>",
        SUFFIX_AS_EOS=True,
        SEP="\n",
        STOP_WORDS=["<eoa>"]),
}
# Qwen's chat format is ChatML.
PROMPT_TEMPLATES["qwen_chat"] = PROMPT_TEMPLATES["chatml"]


def get_template(name_or_dict) -> dict:
    """A template by name, or a user's own dict with the same fields."""
    if isinstance(name_or_dict, dict):
        unknown = set(name_or_dict) - {"SYSTEM", "INSTRUCTION", "SUFFIX", "SUFFIX_AS_EOS", "SEP", "STOP_WORDS"}
        if unknown or "INSTRUCTION" not in name_or_dict:
            raise UserError(f"a custom template needs INSTRUCTION and only the known fields; "
                            f"got unknown fields {sorted(unknown)}")
        return dict(name_or_dict)
    if name_or_dict not in PROMPT_TEMPLATES:
        raise UserError(f"unknown prompt template {name_or_dict!r}; choose one of: "
                        f"{', '.join(sorted(PROMPT_TEMPLATES))}")
    return PROMPT_TEMPLATES[name_or_dict]
