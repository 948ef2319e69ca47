"""Load a model for chatting (terminal, web page, API): weights, adapter, tokenizer, template, system."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..assets import EMBEDDED_MODELS
from ..errors import UserError
from ..model.meta import read_meta
from .system_templates import SYSTEM_TEMPLATES


def chat_defaults(model: str, adapter: str | None) -> dict:
    """Template and system saved with the adapter, else with the model, else the embedded model's own."""
    for folder in (adapter, model):
        meta = read_meta(folder) if folder else {}
        if meta.get("template"):
            return meta
    if model in EMBEDDED_MODELS:
        return {"template": EMBEDDED_MODELS[model].template, "system": EMBEDDED_MODELS[model].system}
    return {}


def resolve_system(system: str | None, system_template: str | None, default: str | None) -> str | None:
    """``--system`` text, else the named ``--system-template``, else the saved default."""
    if system is not None and system_template is not None:
        raise UserError("give either --system or --system-template, not both")
    if system_template is not None:
        if system_template not in SYSTEM_TEMPLATES:
            raise UserError(f"unknown system template {system_template!r}; choose one of: "
                            f"{', '.join(sorted(SYSTEM_TEMPLATES))}")
        return SYSTEM_TEMPLATES[system_template]
    return system if system is not None else default


@dataclass
class ChatModel:
    """A loaded model with what a chat needs to talk to it the way it was trained."""
    name: str
    model: object
    tokenizer: object
    template: str
    system: str | None
    lock: threading.Lock = field(default_factory=threading.Lock)


def quantization_config(bits: int | None):
    """A bitsandbytes config for ``--bits 4|8`` (CUDA only), or None."""
    if bits is None:
        return None
    import torch
    if bits not in (4, 8):
        raise UserError(f"--bits must be 4 or 8, not {bits}")
    if not torch.cuda.is_available():
        raise UserError(f"--bits {bits} needs a CUDA GPU (bitsandbytes); leave --bits out to run on this CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--bits needs bitsandbytes: pip install -e '.[bnb]'") from None
    from transformers import BitsAndBytesConfig
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_chat_model(model: str, adapter: str | None = None, template: str | None = None,
                    system: str | None = None, system_template: str | None = None, bits: int | None = None,
                    device: str = "auto", dtype="auto", name: str | None = None) -> ChatModel:
    """Everything is checked (template, system, adapter folder, bits) before weights are read."""
    from ..data.templates import get_template
    from ..model.loader import load_causal_lm, load_tokenizer
    from ..model.merge import attach_adapter, check_adapter_folder, pick_device, tokenizer_source
    from ..multimodal.export import load_multimodal, multimodal_folder

    defaults = chat_defaults(model, adapter)
    template = template or defaults.get("template")
    if template is None:
        raise UserError(f"no prompt template is saved with {adapter or model}; pass --prompt-template NAME")
    get_template(template)
    system = resolve_system(system, system_template, defaults.get("system"))
    multimodal = multimodal_folder(adapter, model)  # a vision encoder + projector + LLM (tk_multimodal.json)
    if adapter and multimodal is None:
        check_adapter_folder(adapter)
    if multimodal is not None and bits is not None:
        raise UserError(f"--bits is not supported for the multimodal model in {multimodal}; leave it out")
    quantization = quantization_config(bits)
    if quantization is not None and dtype == "auto":
        dtype = "bfloat16"  # the layers bitsandbytes leaves alone, in the dtype its kernels compute in
    device = pick_device(device)
    if multimodal is not None:
        llm = load_multimodal(model, adapter, dtype=dtype, device=device)
    else:
        llm = load_causal_lm(model, dtype=dtype, quantization_config=quantization)
        if quantization is None:
            llm = llm.to(device)
        if adapter:
            llm = attach_adapter(llm, adapter)
    llm.eval()
    tokenizer = load_tokenizer(tokenizer_source(model, adapter))
    if name is None:
        name = Path(adapter).name if adapter else (model if model in EMBEDDED_MODELS else Path(model).name)
    return ChatModel(name=name, model=llm, tokenizer=tokenizer, template=template, system=system)
