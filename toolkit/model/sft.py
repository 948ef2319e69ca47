"""The mmengine model for supervised fine-tuning: an HF causal LM, optionally k-bit and adapted."""
from __future__ import annotations

import logging

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModel

from ..builder import build
from ..errors import UserError
from .adapters import apply_adapter
from .adapters.apply import is_registered_adapter
from .blocks import checkpoint_every_kth_block, keep_deepspeed_hooks_out_of_compile, transformer_blocks
from . import selective_checkpoint
from .long_context import apply_long_context, check_options, restore_dtypes
from .loss import DEFAULT_CHUNK_TOKENS, causal_lm_loss
from .nf4 import use_torch_4bit
from .zero3_blocks import fetches_whole_blocks, mark_blocks_as_zero3_leaves


def _is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def wants_compile(compile) -> bool:
    """``compile=True`` or a dict of Inductor options (``dict()``: compiled with the defaults)."""
    return compile is True or isinstance(compile, dict)


def checkpoint_in_compiled_graph(compile, adapter, offload_activations: bool, recompute_attention: bool) -> bool:
    """Whether compiled blocks of a bf16 model carry their checkpoint inside the compiled graph
    (:func:`.selective_checkpoint.checkpoint_inside_forward`) instead of transformers' checkpoint around the
    compiled call (where transformers 5.17 puts it; 5.2x puts it inside already).

    Around the compiled call, the reentrant kind (tk's choice there before) runs each block's compiled
    inference graph in forward, then torch.utils.checkpoint's Python re-runs the compiled training graph from
    inside the autograd engine; a profile of the 7B LoRA step on an H100 charged most of the GPU's idle time
    to that (``CheckpointFunctionBackward``). Inside the graph AOTAutograd plans the recompute within the
    block's compiled backward: the 7B LoRA step ran 5.6% faster on one H100 (9,791 against 9,274 tokens/s),
    at 15.88 GiB instead of 15.67. Both give the gradient of the step's own loss with LoRA dropout
    (tests/gpu/test_fast_path_gpu.py: the loss's central difference along the gradient, fp32, 0.25% off for
    either; a recompute drawing other masks is 6.5% off).

    Full fine-tuning (no adapter) takes the same path; it was not measured on one GPU (under ZeRO-3 it stays
    where DeepSpeed fetches each block whole, :mod:`.zero3_blocks`, and moves back otherwise, below). Not for
    tk's circuit adapters (their unitary is built once a forward; they keep the non-reentrant kind around the
    call), offloaded activations (the offload hooks wrap the checkpoint from outside), or
    ``recompute_attention=False`` (its selective checkpoint is inside the compiled graph already). QLoRA
    keeps peft's preparation (measured inside the graph, the 7B QLoRA step held 24.6 GiB instead of 8.0).
    Under ZeRO-3 with DeepSpeed's per-linear fetches (``TK_ZERO3_FETCH=module``, circuit adapters) the
    checkpoint moves back around the compiled call (``blocks._checkpoint_outside``).
    """
    from .offload import checkpoint_inside_compiled_block  # looked up per call (tests stand in for it)
    compiled = wants_compile(compile) and torch.cuda.is_available()
    return (compiled and recompute_attention and not offload_activations and not is_registered_adapter(adapter)
            and not checkpoint_inside_compiled_block())


def compile_blocks(model, options: dict | None = None) -> int:
    """``torch.compile`` every transformer block in place (the classes HF lists in ``_no_split_modules``).

    Compiling the block, not the whole model, keeps the graph small and reused by every layer (torch inlines
    module instances, so 32 identical layers share one compiled graph) and keeps gradient checkpointing,
    adapters and tk's loss outside it. Fuses the norms, activations, RoPE, residual adds, dtype casts and
    LoRA's dropout and scaling into a few kernels. bitsandbytes 4-bit linears are routed through torch ops
    first (:mod:`.nf4`), so their dequantization compiles into the block instead of costing a Python
    custom-op call each (what bound the compiled QLoRA step). ``options``: Inductor options for every block,
    e.g. ``{"cpp_wrapper": True}``. Returns how many blocks were compiled.
    """
    use_torch_4bit(model)
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(options=dict(options or {}))
    return len(blocks)


class SupervisedFinetune(BaseModel):
    """``llm`` (config dict or module) + optional ``adapter``; ``forward(mode='loss')`` for the Runner.

    With an adapter, only the adapter's weights are trainable and only they go into checkpoints;
    without one (full fine-tuning), every weight does. ``compile=True`` compiles each transformer block
    on CUDA (:func:`compile_blocks`); on a CPU the option is ignored with a log line. A dict instead of True
    passes Inductor options. One measured and not recommended: ``compile=dict(cpp_wrapper=True)`` (the code
    that launches a block's kernels in C++) took a compiled 7B LoRA step on an H100 from 6,768 to 8,344
    tokens/s once, and failed to compile in two later runs on torch 2.11 ("CudaKernelParamCache not
    populated"), one of them in a fresh process.

    Long context (docs/long_context.md): ``offload_activations`` keeps the checkpointed block inputs in host
    memory, ``tiled_mlp`` (True or tokens per tile) runs each MLP over tiles of the sequence, and
    ``loss_chunk_tokens`` (None: never) bounds how many positions' logits exist at once.
    ``upcast_unquantized=False`` (4/8-bit models) keeps the weights bitsandbytes did not quantize in their
    loaded dtype instead of peft's fp32 (whose fp32 embeddings make the whole residual stream fp32).
    ``recompute_attention=False`` keeps each checkpointed block's attention output, so backward recomputes
    the rest of the block but not the attention (:mod:`.selective_checkpoint`).
    ``checkpoint_every=k`` (with ``gradient_checkpointing``) checkpoints only blocks 0, k, 2k, ...: the others
    keep their activations, trading memory for less recompute (docs/benchmarks.md, full fine-tuning).
    """

    def __init__(self, llm, adapter=None, gradient_checkpointing: bool = False, compile: bool | dict = False,
                 offload_activations: bool = False, tiled_mlp: bool | int = False,
                 loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS, upcast_unquantized: bool = True,
                 recompute_attention: bool = True, checkpoint_every: int = 1,
                 data_preprocessor=None):
        super().__init__(data_preprocessor=data_preprocessor)
        tile_tokens, self.loss_chunk_tokens = check_options(gradient_checkpointing, offload_activations, tiled_mlp,
                                                            loss_chunk_tokens, recompute_attention,
                                                            checkpoint_every)
        model = build(llm) if isinstance(llm, dict) else llm
        model.config.use_cache = False
        if _is_quantized(model):
            from peft import prepare_model_for_kbit_training
            loaded = {name: p.dtype for name, p in model.named_parameters()}
            # peft checkpoints the reentrant way unless told otherwise; tk's circuit adapters need the other
            # kind (their unitary, built once a forward, would be backpropagated once per layer)
            kinds = {"use_reentrant": False} if is_registered_adapter(adapter) else None
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs=kinds)
            if not upcast_unquantized:
                restore_dtypes(model, loaded)
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if adapter is not None:
                model.enable_input_require_grads()
        if gradient_checkpointing and checkpoint_every > 1:
            kept, total = checkpoint_every_kth_block(model, checkpoint_every)
            if total == 0:
                raise UserError(f"model.checkpoint_every={checkpoint_every}: {type(model).__name__} has no decoder "
                                f"layer that transformers checkpoints (GradientCheckpointingLayer; remote-code "
                                f"models have their own); remove checkpoint_every")
            print_log(f"checkpoint_every={checkpoint_every}: {kept} of {total} blocks checkpointed, the others "
                      f"keep their activations", logger="current")
        self.uses_adapter = adapter is not None
        self.llm = apply_adapter(model, adapter)
        if wants_compile(compile) and torch.cuda.is_available():
            options = compile if isinstance(compile, dict) else None
            print_log(f"compile={compile}: {compile_blocks(self.llm, options)} transformer blocks compiled",
                      logger="current")
            if (gradient_checkpointing and not _is_quantized(model)
                    and checkpoint_in_compiled_graph(compile, adapter, offload_activations, recompute_attention)):
                moved = selective_checkpoint.checkpoint_inside_forward(self.llm)
                print_log(f"compile={compile}: {moved} blocks checkpoint inside their compiled graph", logger="current")
            if fetches_whole_blocks(compile, adapter, offload_activations, _is_quantized(model)):  # inert w/o ZeRO-3
                mark_blocks_as_zero3_leaves(self.llm)
            # DeepSpeed adds its hooks after this; the model's first call (a training step, or a hook's generate:
            # both start at the embeddings) wraps them before any compiled block runs
            embeddings = self.llm.get_input_embeddings()
            self._wrap_once = embeddings.register_forward_pre_hook(self._keep_deepspeed_hooks_out_of_compile)
        elif wants_compile(compile):
            print_log(f"compile={compile!r}: no CUDA device, so the blocks run eagerly (same numbers, no fused "
                      "kernels)", logger="current")
        self.activation_offloader, lines = apply_long_context(self.llm, offload_activations, tile_tokens,
                                                              recompute_attention)
        self.recompute_attention = recompute_attention
        self._kept_attention_before = selective_checkpoint.kept_attention
        for line in lines:
            print_log(line, logger="current")

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, mode: str = "loss"):
        if mode != "loss":
            raise NotImplementedError(f"SupervisedFinetune only computes the training loss (mode={mode!r})")
        loss = causal_lm_loss(self.llm, input_ids, labels, attention_mask, position_ids,
                              chunk_tokens=self.loss_chunk_tokens)
        self._check_switches_once()
        return {"loss": loss}

    def _keep_deepspeed_hooks_out_of_compile(self, module, args) -> None:
        self._wrap_once.remove()
        keep_deepspeed_hooks_out_of_compile(self.llm)

    def _check_switches_once(self) -> None:
        """After the first training forward: say so if a switch changed nothing. offload_activations: a model
        whose layers take their hidden states by keyword gives the checkpoint no tensor argument to offload.
        recompute_attention=False: sdpa took its math fallback (not one kernel), so nothing was kept."""
        if getattr(self, "_switches_checked", False) or not (self.training and torch.is_grad_enabled()):
            return
        self._switches_checked = True
        offloader = self.activation_offloader
        if offloader is not None and offloader.packed_count == 0:
            print_log("offload_activations=True: the first training step moved no block input to host memory "
                      "(this model's layers may take their hidden states by keyword); GPU memory is as "
                      "without offload", logger="current", level=logging.WARNING)
        if not self.recompute_attention and selective_checkpoint.kept_attention == self._kept_attention_before:
            print_log("recompute_attention=False: the first training step kept no attention output (sdpa ran "
                      "its math fallback, or its kernels drew dropout), so backward recomputes attention as "
                      "with full checkpointing", logger="current", level=logging.WARNING)

    def init_weights(self) -> None:
        """Nothing to do: weights come from the checkpoint and the adapter's own init. mmengine's Runner
        calls this before training, and passing it on would let transformers re-initialise the adapter's
        new modules (LoRA B would start random instead of zero)."""

    def trainable_parameter_count(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """Only the trainable weights when an adapter is used (small checkpoints, like XTuner)."""
        full = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not self.uses_adapter:
            return full
        trainable = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
        return type(full)((k, v) for k, v in full.items() if k in trainable)

    @torch.no_grad()
    def generate(self, input_ids, **kwargs):
        return self.llm.generate(input_ids=input_ids, **kwargs)
