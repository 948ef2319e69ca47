"""Load tokenizers and causal LMs from an HF id, a local folder or an embedded alias."""
from __future__ import annotations

from pathlib import Path

import torch

from ..assets import resolve_model_path
from ..builder import build
from ..errors import UserError
from . import varlen_attention  # noqa: F401  registers attn_implementation='tk_varlen' with transformers

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def to_dtype(dtype):
    if dtype in (None, "auto") or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _existing(path: str) -> str:
    resolved = resolve_model_path(path)
    looks_local = resolved.startswith((".", "/", "~")) or Path(resolved).expanduser().exists()
    if looks_local and not (Path(resolved).expanduser() / "config.json").is_file() \
            and not (Path(resolved).expanduser() / "tokenizer_config.json").is_file():
        raise UserError(f"model path '{path}' is not an HF model folder (no config.json); "
                        f"set pretrained_model_name_or_path in the config to a folder that has one")
    return str(Path(resolved).expanduser()) if looks_local else resolved


def _remote_code_error(path: str, exc: ValueError) -> Exception:
    """transformers refuses a model folder that ships its own Python code unless trust_remote_code is set."""
    if "trust_remote_code" not in str(exc):
        return exc
    return UserError(f"model '{path}' ships its own Python code, which tk does not run by default; if you trust it, "
                     f"set trust_remote_code=True for the model and tokenizer in the config")


def _hub_error(path: str, exc: Exception) -> UserError:
    return UserError(f"could not load model '{path}': {type(exc).__name__}: {str(exc).splitlines()[0]} "
                     f"(no model hub is reachable offline: point pretrained_model_name_or_path at a local folder)")


def load_model_config(path: str, trust_remote_code: bool = False):
    """The model's ``AutoConfig`` (its config.json), with tk's path resolution and errors; reads no weights."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(_existing(path), trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise _hub_error(path, exc) from None
    except ValueError as exc:
        raise _remote_code_error(path, exc) from None


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str = "right", **kwargs):
    from transformers import AutoTokenizer
    resolved = _existing(path)
    try:
        return AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code,
                                             padding_side=padding_side, **kwargs)
    except OSError as exc:
        raise _hub_error(path, exc) from None
    except ValueError as exc:
        raise _remote_code_error(path, exc) from None


def build_tokenizer(tokenizer):
    """A tokenizer object, a config dict that builds one, or a path/alias."""
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(str(tokenizer))
    return build(tokenizer)


def load_causal_lm(path: str, dtype="auto", quantization_config=None, trust_remote_code: bool = False,
                   attn_implementation: str | None = None, device_map=None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with tk's conventions.

    ``quantization_config`` (a ``BitsAndBytesConfig``) puts the weights on the current CUDA device,
    as bitsandbytes requires.
    """
    from transformers import AutoModelForCausalLM
    resolved = _existing(path)
    if quantization_config is not None:
        if not torch.cuda.is_available():
            raise UserError("4/8-bit quantization (QLoRA) needs a CUDA GPU; on CPU remove "
                            "quantization_config from the model in the config")
        if device_map is None:
            device_map = {"": torch.cuda.current_device()}
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolved, dtype=to_dtype(dtype), quantization_config=quantization_config,
            trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
            device_map=device_map, **kwargs)
    except OSError as exc:
        raise _hub_error(path, exc) from None
    except ValueError as exc:
        raise _remote_code_error(path, exc) from None
