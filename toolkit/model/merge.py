"""``tk convert merge``: fold a LoRA (or other linear) adapter into its base model's weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..outputs import check_writable_output, staged_output
from .adapters import quantum
from .loader import load_causal_lm, load_tokenizer
from .meta import META_FILE, read_meta


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is present; use --device cpu")
    return device


def check_adapter_folder(adapter) -> None:
    """A folder tk's circuit adapters or peft wrote; anything else is refused before weights load."""
    if not quantum.is_adapter_folder(adapter) and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not an adapter folder (no adapter_config.json); "
                        f"pass the folder written by `tk convert pth_to_hf`")


def attach_adapter(model, adapter):
    """``model`` with the adapter folder's weights on top (tk's circuit adapters or peft's)."""
    if quantum.is_adapter_folder(adapter):
        return quantum.load_adapter(model, adapter)
    from peft import PeftModel
    return PeftModel.from_pretrained(model, str(adapter))


def tokenizer_source(base: str, adapter=None) -> str:
    """The tokenizer saved beside the adapter (pth_to_hf writes one), else the base model's."""
    return str(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base


def load_adapted(base: str, adapter, dtype="auto", device: str = "cpu"):
    """The base model with the adapter from ``adapter`` (a folder that peft or tk wrote) on top."""
    check_adapter_folder(adapter)
    return attach_adapter(load_causal_lm(base, dtype=dtype).to(device), adapter)


#: the probe input: a short fixed text, so every merge is checked on the same tokens
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42. 你好！"
#: largest accepted |merged - unmerged| logit, relative to the largest |logit|, by the weights' dtype: merging
#: rounds W + BA to that dtype (measured on SmolLM2 with a random rank-16 LoRA: fp32 3e-6, fp16 5e-3, bf16 6e-2)
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def probe_ids(tokenizer, device) -> torch.Tensor:
    return torch.tensor([tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]], device=device)


@torch.no_grad()
def probe_logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()  # no dropout in the comparison
    return model(input_ids=ids).logits.float()


def check_merged(unmerged: torch.Tensor, merged: torch.Tensor, dtype) -> float:
    """The largest logit difference between the merged model and base + adapter; a UserError above the
    tolerance for ``dtype`` (so nothing is written)."""
    difference = (merged - unmerged).abs().max().item()
    tolerance = RELATIVE_TOLERANCE.get(dtype, 1e-1) * max(1.0, unmerged.abs().max().item())
    if not difference <= tolerance:  # also NaN
        hint = "use the adapter unmerged (tk chat BASE --adapter ADAPTER)" if dtype == torch.float32 else \
            "merge in float32 (--dtype float32), or use the adapter unmerged"
        raise UserError(f"the merged model's logits differ from base + adapter by up to {difference:.3g} on a probe "
                        f"input (tolerance {tolerance:.3g} in {str(dtype).removeprefix('torch.')}); nothing was "
                        f"written: {hint}")
    print(f"merge check: max |merged - unmerged| logit difference {difference:.3g} on a probe input "
          f"(tolerance {tolerance:.3g} in {str(dtype).removeprefix('torch.')})")
    return difference


def merge(base: str, adapter, out, device: str = "auto", max_shard_size: str = "5GB", dtype="auto",
          force: bool = False) -> Path:
    out = check_writable_output(out, force)
    device = pick_device(device)
    tk_adapter = quantum.is_adapter_folder(adapter)
    if tk_adapter:
        quantum.check_mergeable(quantum.read_config(adapter))  # refuse before loading or writing anything
    model = load_adapted(base, adapter, dtype=dtype, device=device)
    tokenizer = load_tokenizer(tokenizer_source(base, adapter))
    probe = probe_ids(tokenizer, device)
    unmerged = probe_logits(model, probe)
    merged = quantum.merge_and_unload(model) if tk_adapter else model.merge_and_unload()
    check_merged(unmerged, probe_logits(merged, probe), merged.get_input_embeddings().weight.dtype)
    with staged_output(out, force) as staging:
        merged.save_pretrained(str(staging), max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        if read_meta(adapter):
            shutil.copy(Path(adapter) / META_FILE, staging / META_FILE)
    return out
