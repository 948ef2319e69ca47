"""``attn_implementation='tk_varlen'``: packed rows through flash attention's variable-length kernel.

A packed row (documents end to end, ``position_ids`` restarting at 0, no attention mask) reaches sdpa as a
block-diagonal [T, T] boolean mask that transformers builds from the position ids. sdpa's flash and cuDNN
kernels take no mask, so a masked call runs the memory-efficient kernel over the whole square, masked
blocks included, and the mask itself costs T² bytes (4 GiB at 64k). Flash attention's varlen form instead
takes the documents' boundaries (``cu_seqlens``) and computes each document's causal triangle only: the work
of the real documents, at flash speed, with no mask. torch ships that kernel
(``torch.nn.attention.varlen.varlen_attn``); this module registers it with transformers as the attention
implementation ``tk_varlen``.

- Packed batches: :func:`packed_attention_kwargs` turns the position ids into flash-attention's keyword
  arguments (``cu_seq_lens_q/k``, ``max_length_q/k``, transformers' own names, so ``flash_attention_2``
  takes them too), once per forward on the host; ``causal_lm_loss`` passes them to the decoder inside
  :func:`packed_rows`, which also tells the mask function to build no [T, T] mask.
- Everything else (unpacked or padded batches, generation) gets exactly the sdpa path: the same mask
  (``sdpa_mask``) and ``sdpa_attention_forward``.
- Where the kernel cannot run (no CUDA, fp32 compute, attention dropout in training, head size > 256, a
  torch without ``varlen_attn``) a packed row falls back to sdpa with the block-diagonal causal mask built
  from the boundaries: the numbers sdpa gives packed rows, bit for bit on a CPU.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from ..errors import UserError

NAME = "tk_varlen"

_packed = contextvars.ContextVar("tk_varlen_packed_forward", default=False)

try:
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_PARAMS = inspect.signature(varlen_attn).parameters
except ImportError:  # torch < 2.9
    varlen_attn, _VARLEN_PARAMS = None, {}


def packed_attention_kwargs(position_ids: torch.Tensor, device=None) -> dict:
    """Flash-attention keyword arguments for rows of documents whose positions restart at 0.

    ``position_ids`` [B, T]: each row starts a document at position 0, and a position either follows the one
    before it or restarts at 0. The rows are laid end to end (B * T tokens), so row boundaries are document
    boundaries too. Computed on the host (one copy of the ids), then sent to ``device``.
    """
    ids = position_ids.detach().to("cpu").reshape(position_ids.shape[0], -1)
    if ids.shape[1] == 0:
        raise UserError("attn_implementation='tk_varlen': a packed batch with empty rows")
    if bool((ids[:, 0] != 0).any()):
        raise UserError("attn_implementation='tk_varlen': packed rows must start a document at position 0 "
                        "(position_ids[:, 0] != 0); pack with tk's collate (packed_collate_fn)")
    flat = ids.reshape(-1)
    steps = flat[1:] - flat[:-1]
    if not bool(((steps == 1) | (flat[1:] == 0)).all()):
        raise UserError("attn_implementation='tk_varlen': packed position_ids must count up by one within a "
                        "document and restart at 0; pack with tk's collate (packed_collate_fn)")
    starts = torch.nonzero(flat == 0).flatten()
    boundaries = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int((boundaries[1:] - boundaries[:-1]).max())
    boundaries = boundaries.to(device if device is not None else position_ids.device, non_blocking=True)
    return {"cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries, "max_length_q": longest,
            "max_length_k": longest}


@contextlib.contextmanager
def packed_rows():
    """Within: the ``tk_varlen`` mask function builds no mask (the boundaries travel as keyword arguments)."""
    token = _packed.set(True)
    try:
        yield
    finally:
        _packed.reset(token)


def varlen_mask(*args, **kwargs):
    """Mask function of ``tk_varlen``: none for a packed forward, else exactly sdpa's."""
    if _packed.get():
        return None
    return sdpa_mask(*args, **kwargs)


def block_causal_mask(cu_seq_lens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """[batch, 1, length, length] bool: a token sees the earlier tokens of its own document (the mask
    transformers builds for sdpa from packed position ids)."""
    starts = torch.zeros(batch * length, dtype=torch.int32, device=cu_seq_lens.device)
    starts[cu_seq_lens[1:-1].long()] = 1
    document = starts.cumsum(0).view(batch, length)
    same = document[:, :, None] == document[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=cu_seq_lens.device).tril()
    return (same & causal)[:, None]


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype sdpa would compute in here: autocast's, where it is on."""
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return query.dtype


def kernel_refusal(query: torch.Tensor, dropout: float, scaling: float | None) -> str | None:
    """Why the varlen kernel cannot run this call (None: it can)."""
    if varlen_attn is None:
        return "this torch has no torch.nn.attention.varlen"
    if query.device.type != "cuda":
        return f"the varlen kernel needs CUDA (tensors on {query.device.type})"
    if _compute_dtype(query) not in (torch.float16, torch.bfloat16):
        return f"the varlen kernel computes in fp16/bf16, not {_compute_dtype(query)}"
    if dropout:
        return f"attention dropout {dropout} in training (the varlen kernel has none)"
    if query.shape[-1] > 256 or query.shape[-1] % 8:
        return f"head size {query.shape[-1]} (the kernel takes multiples of 8 up to 256)"
    if scaling is not None and "scale" not in _VARLEN_PARAMS and abs(scaling - query.shape[-1] ** -0.5) > 1e-12:
        return "a non-default attention scale, which this torch's varlen_attn cannot take"
    return None


def _run_kernel(query, key, value, cu_seq_lens, longest: int, scaling):
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] -> [B, T, Hq, D] through ``varlen_attn``."""
    batch, heads, length, dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention: repeat the key/value heads, as sdpa's path does
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    dtype = _compute_dtype(query)

    def tokens(x):
        return x.transpose(1, 2).reshape(batch * length, heads, dim).to(dtype)
    kwargs = {"scale": scaling} if "scale" in _VARLEN_PARAMS else {}
    if "is_causal" in _VARLEN_PARAMS:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    out = varlen_attn(tokens(query), tokens(key), tokens(value), cu_seq_lens, cu_seq_lens, longest, longest, **kwargs)
    return out.view(batch, length, heads, dim)


def _check_packed_call(module, cu_seq_lens, kwargs) -> None:
    """One-line errors where a packed forward would silently compute other attention than sdpa's: the layer
    did not pass the boundaries on, or the model's attention is more than causal within a document."""
    if cu_seq_lens is None:
        raise UserError(f"attn_implementation='tk_varlen': {type(module).__name__} does not pass keyword arguments "
                        f"on to its attention function, so packed documents would see each other; use "
                        f"attn_implementation='sdpa' for this model")
    extras = [name for name in ("sliding_window", "softcap", "s_aux", "position_bias")
              if kwargs.get(name) is not None]
    if not getattr(module, "is_causal", True):
        extras.append("is_causal=False")
    if extras:
        raise UserError(f"attn_implementation='tk_varlen' computes plain causal attention within each document; "
                        f"{type(module).__name__} needs {', '.join(extras)}: use attn_implementation='sdpa'")


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention function (query [B, H, T, D]); returns ([B, T, H, D], None) like sdpa's."""
    kwargs.pop("cu_seq_lens_k", None)
    kwargs.pop("max_length_k", None)
    if _packed.get():
        _check_packed_call(module, cu_seq_lens_q, kwargs)
    if cu_seq_lens_q is None or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, _, length, _ = query.shape
    cu_seq_lens_q = cu_seq_lens_q.to(query.device, non_blocking=True)
    if kernel_refusal(query, dropout, scaling) is None:
        return _run_kernel(query, key, value, cu_seq_lens_q, max_length_q or length, scaling), None
    mask = block_causal_mask(cu_seq_lens_q, batch, length)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


def uses_varlen(model) -> bool:
    """Whether ``model`` (or the model under its adapter) was loaded with ``attn_implementation='tk_varlen'``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == NAME


AttentionInterface.register(NAME, varlen_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
