"""Checkpointed activations in host memory: what gradient checkpointing keeps between forward and backward.

With gradient checkpointing, each transformer block keeps only its input (the hidden states, [batch,
tokens, hidden]) until backward recomputes it. At long context those inputs are most of what stays on the
GPU: a 7B llama at 256k tokens keeps 32 layers x 256k x 4096 values (64 GiB in bf16, 128 GiB in fp32).
:func:`offload_checkpointed_inputs` wraps the model's checkpoint function in ``saved_tensors_hooks`` that
copy those inputs to pinned host memory in forward and bring each back when backward reaches its block.

Only the block inputs are moved: non-reentrant checkpointing saves them through the hooks that are active
around the ``checkpoint`` call, while everything a block saves inside goes through checkpoint's own,
innermost hooks (so it is recomputed, never copied). On CUDA the copies run on a side stream, overlapped
with compute: forward copies a block's input out while the next blocks run; backward, on bringing block
k's input back, already starts fetching block k-1's, so it is ready when the recompute reaches it.
The same idea as ``torch.autograd.graph.save_on_cpu`` (which copies every saved tensor, on the compute
stream), DeepSpeed's ``cpu_checkpointing`` and unsloth's offloaded gradient checkpointing.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .blocks import checkpoint_around_compiled_call


class _Offloaded:
    """One saved tensor in host memory; ``prev`` is the one saved just before it (the next one backward needs)."""

    __slots__ = ("host", "device", "device_copy", "ready", "prev", "used", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, prev):
        self.host, self.device, self.prev = host, device, prev
        self.device_copy, self.ready, self.used = None, None, False


class ActivationOffloader:
    """``pack``/``unpack`` for ``saved_tensors_hooks``: device tensors go to (pinned) host memory.

    ``packed_count``/``packed_bytes`` count what was copied out (tests and logs read them).
    """

    def __init__(self):
        self.stream = None
        self.packed_count = self.packed_bytes = 0
        self._last = None  # weak reference to the most recently packed _Offloaded

    def _side_stream(self):
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def pack(self, tensor: torch.Tensor):
        if tensor.numel() == 0:
            return tensor  # checkpoint's own empty marker tensor
        cuda = tensor.device.type == "cuda"
        try:
            host = torch.empty_like(tensor, device="cpu", pin_memory=cuda)  # same strides: a transposed one too
        except RuntimeError as exc:  # pinned host memory is what ran out
            size = tensor.numel() * tensor.element_size()
            raise UserError(f"offload_activations: no host memory for one more checkpointed block input "
                            f"({size / 2**30:.2f} GiB; {str(exc).splitlines()[0]}); lower max_length, or for QLoRA "
                            f"set upcast_unquantized=False to halve them") from None
        if cuda:
            stream = self._side_stream()
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is reused only once the copy is done
        else:
            host.copy_(tensor)
        prev = self._last() if self._last is not None else None
        item = _Offloaded(host, tensor.device, weakref.ref(prev) if prev is not None else None)
        self._last = weakref.ref(item)
        self.packed_count += 1
        self.packed_bytes += tensor.numel() * tensor.element_size()
        return item

    def _fetch(self, item: _Offloaded) -> None:
        """Start copying ``item`` back to its device (on the side stream where CUDA is present)."""
        if item.device.type != "cuda":
            item.device_copy = item.host.to(item.device)
            return
        main = torch.cuda.current_stream(item.device)
        item.device_copy = torch.empty_like(item.host, device=item.device)
        stream = self._side_stream()
        stream.wait_stream(main)  # the new block's memory may still be read by earlier kernels
        with torch.cuda.stream(stream):
            item.device_copy.copy_(item.host, non_blocking=True)
            item.ready = torch.cuda.Event()
            item.ready.record(stream)
        # allocated on the main stream, written on the side one: a copy dropped before its unpack (an error
        # mid-backward, autograd.grad over part of the graph) must not free memory the copy still writes
        item.device_copy.record_stream(stream)

    def unpack(self, item):
        if isinstance(item, torch.Tensor):
            return item
        if item.device_copy is None:
            self._fetch(item)
        if item.ready is not None:
            torch.cuda.current_stream(item.device).wait_event(item.ready)
        tensor, item.device_copy, item.ready, item.used = item.device_copy, None, None, True
        prev = item.prev() if item.prev is not None else None
        if prev is not None and not prev.used and prev.device_copy is None and item.device.type == "cuda":
            self._fetch(prev)  # prefetch: the block before this one is recomputed next
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def input_hooks(self, block_input: torch.Tensor):
        """Hooks that move only what shares ``block_input``'s storage to host memory, for a compiled block with
        the checkpoint inside its graph: there the graph saves its input next to what the checkpoint policy
        keeps (the attention outputs) and the weights, and only the input is the offloaded kind."""
        storage = block_input.untyped_storage().data_ptr()

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() != storage:
                return tensor
            return self.pack(tensor)
        return torch.autograd.graph.saved_tensors_hooks(pack, self.unpack)


def offloaded_checkpoint(offloader: ActivationOffloader, function, *args, **kwargs):
    """Non-reentrant ``checkpoint`` whose saved inputs live in host memory (drop-in for HF's checkpoint function)."""
    kwargs["use_reentrant"] = False
    with offloader.hooks():
        return checkpoint(function, *args, **kwargs)


def offload_input_around_compiled_call(module, offloader: ActivationOffloader) -> None:
    """Run ``module``'s compiled call (whose graph checkpoints inside) with its input saved in host memory."""
    module._compiled_call_impl = functools.partial(_input_offloaded_call, module, offloader,
                                                   module._compiled_call_impl)


def _input_offloaded_call(module, offloader: ActivationOffloader, call, *args, **kwargs):
    block_input = args[0] if args else kwargs.get("hidden_states")
    if not (module.training and torch.is_grad_enabled() and isinstance(block_input, torch.Tensor)):
        return call(*args, **kwargs)
    with offloader.input_hooks(block_input):
        return call(*args, **kwargs)


def offload_checkpointed_inputs(model, offloader: ActivationOffloader) -> int:
    """Make every module that checkpoints (HF sets ``gradient_checkpointing`` and ``_gradient_checkpointing_func``
    on each decoder layer) keep its checkpointed inputs in host memory through ``offloader``. Returns how many
    decoder layers; 0 means gradient checkpointing is not enabled.

    Call it after ``block.compile()``: where transformers checkpoints inside the block's ``forward``
    (:func:`checkpoint_inside_compiled_block`), a compiled block would trace the offload hooks, which dynamo
    cannot, and fall back to eager; such a block instead gets the checkpoint around its compiled call
    (as transformers 5.17 does it) and HF's own checkpoint inside it is switched off.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer
    function = functools.partial(offloaded_checkpoint, offloader)
    modules = [m for m in model.modules()
               if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]
    inside = checkpoint_inside_compiled_block()
    for module in modules:
        compiled = getattr(module, "_compiled_call_impl", None)
        if inside and compiled is not None and isinstance(module, GradientCheckpointingLayer):
            checkpoint_around_compiled_call(module, function)
        else:
            module._gradient_checkpointing_func = function
    if modules:
        _stop_inputs_requiring_grad(model)
    return sum(isinstance(m, GradientCheckpointingLayer) for m in modules)


#: What transformers' and peft's ``enable_input_require_grads`` name their embedding hook
REQUIRE_GRADS_HOOK_NAMES = frozenset({"make_inputs_require_grads", "make_inputs_require_grad"})


def _stop_inputs_requiring_grad(model) -> None:
    """Remove the hook (``enable_input_require_grads``, set by peft's k-bit preparation and for adapters) that
    makes the embeddings' output require grad. Only reentrant checkpointing needs it, and offloading is
    non-reentrant; with it the first block's input is a leaf whose gradient accumulator keeps it on the
    device, so one block input (2-4 GiB at 256k tokens on a 7B model) would never leave GPU memory.
    tk and peft may each have registered it (transformers keeps the handle of the last call only), so the
    hooks are found by the names transformers and peft give them."""
    from transformers import PreTrainedModel
    names = REQUIRE_GRADS_HOOK_NAMES
    for module in model.modules():
        try:
            embeddings = module.get_input_embeddings() if isinstance(module, PreTrainedModel) else None
        except NotImplementedError:
            embeddings = None
        if embeddings is not None:
            hooks = embeddings._forward_hooks
            for key in [k for k, fn in hooks.items() if getattr(fn, "__name__", "") in names]:
                del hooks[key]


def checkpoint_inside_compiled_block() -> bool:
    """True where transformers checkpoints inside a block's ``forward`` (5.2x) rather than around its
    ``__call__`` (5.17): there ``block.compile()`` compiles the checkpoint call too."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return "__call__" not in vars(GradientCheckpointingLayer)
