"""Tokens/s, TFLOPs and MFU per device, and peak memory, logged every iteration (logs and tensorboard).

FLOPs per trained sequence of ``n`` real (non-pad) tokens, the PaLM convention (no recompute counted,
so this is MFU, not HFU):

    full fine-tuning:           6 * N * n + 12 * L * d * n^2
    frozen base + adapter:      (4 * N + 6 * N_trainable) * n + 12 * L * d * n^2

``N`` counts the weights that do matmuls (all parameters except an untied input embedding; a 4-bit
weight counts as its unpacked size). Forward is 2N per token and backward 4N when every weight gets a
gradient; a frozen weight still passes the activation gradient back (2N) but computes no weight
gradient. Attention (QK^T and AV) costs 4*L*d*n^2 forward, twice that backward, whatever is frozen.
The peak is the device's dense 16-bit tensor figure (``PEAK_TFLOPS``, or ``peak_tflops=`` in the
config); where unknown (a CPU) MFU is not logged.
"""
from __future__ import annotations

import resource
import sys

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from ...registry import HOOKS

#: dense bf16/fp16 tensor-core TFLOPs, matched against ``torch.cuda.get_device_name()`` in this order.
PEAK_TFLOPS = [("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0), ("A100", 312.0),
               ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
               ("4090", 165.0), ("3090", 71.0), ("V100", 125.0), ("T4", 65.0)]


def peak_tflops(device_name: str | None) -> float | None:
    for key, value in PEAK_TFLOPS:
        if device_name and key in device_name.upper():
            return value
    return None


def matmul_params(llm: torch.nn.Module) -> tuple[int, int]:
    """(N, N_trainable): weights used in matmuls; see the module docstring."""
    def size(p):
        return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()
    total = sum(size(p) for p in llm.parameters())
    trainable = sum(size(p) for p in llm.parameters() if p.requires_grad)
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if inputs is not None and (outputs is None or outputs.weight is not inputs.weight):
        total -= size(inputs.weight)
        trainable -= size(inputs.weight) if inputs.weight.requires_grad else 0
    return total, trainable


def train_flops(lengths: list, n_params: int, n_trainable: int, layers: int, hidden: int) -> float:
    """Training FLOPs for sequences of these real lengths (the module docstring's formula)."""
    per_token = 6 * n_params if n_trainable >= n_params else 4 * n_params + 6 * n_trainable
    return float(sum(per_token * n + 12 * layers * hidden * n * n for n in lengths))


def sequence_lengths(data_batch: dict) -> list:
    """Real tokens per sequence: a packed row (``position_ids`` restarting at 0) counts each document
    apart (attention stays inside it); a padded batch counts ``attention_mask`` per row."""
    if data_batch.get("position_ids") is not None and data_batch.get("attention_mask") is None:
        lengths = []
        for row in data_batch["position_ids"]:
            starts = (row == 0).nonzero().flatten().tolist() + [len(row)]
            lengths += [end - start for start, end in zip(starts, starts[1:]) if end > start]
        return lengths
    if data_batch.get("attention_mask") is not None:
        return data_batch["attention_mask"].sum(dim=1).tolist()
    return [data_batch["input_ids"].shape[1]] * data_batch["input_ids"].shape[0]


def peak_memory_gib() -> tuple[str, float]:
    """('peak_mem_gib', allocated on the GPU) or ('peak_rss_gib', the process's resident peak on a CPU)."""
    if torch.cuda.is_available():
        return "peak_mem_gib", torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "peak_rss_gib", rss / (2**30 if sys.platform == "darwin" else 2**20)


@HOOKS.register_module()
class ThroughputHook(Hook):
    """Logs ``tokens_per_sec``, ``tflops`` and (with a known peak) ``mfu`` per device, and peak memory.

    The iteration time is the one ``IterTimerHook`` measures (data loading included). At the end it
    logs the run's mean over the iterations after the first (which pays for warm-up).
    """

    priority = "NORMAL"  # after IterTimerHook (NORMAL, registered first) has timed the iteration, before LoggerHook

    def __init__(self, peak_tflops: float | None = None):
        self.peak = peak_tflops
        self.tokens = self.seconds = self.flops = 0.0
        self._first_iter = 0

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        llm = model.llm
        config = (llm.get_base_model() if hasattr(llm, "get_base_model") else llm).config
        config = getattr(config, "text_config", config)
        self.n_params, self.n_trainable = matmul_params(llm)
        self.layers, self.hidden = config.num_hidden_layers, config.hidden_size
        if self.peak is None and torch.cuda.is_available():
            self.peak = peak_tflops(torch.cuda.get_device_name())
        runner.logger.info(f"throughput: {self.n_params / 1e6:.1f}M matmul weights, "
                           f"{self.n_trainable / 1e6:.2f}M trainable; peak "
                           f"{f'{self.peak:g} TFLOPs per device' if self.peak else 'unknown (no MFU)'}")

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not isinstance(data_batch, dict) or "input_ids" not in data_batch:
            return
        lengths = sequence_lengths(data_batch)
        seconds = runner.message_hub.get_scalar("train/time").current()
        flops = train_flops(lengths, self.n_params, self.n_trainable, self.layers, self.hidden)
        hub = runner.message_hub
        hub.update_scalar("train/tokens_per_sec", sum(lengths) / seconds)
        hub.update_scalar("train/tflops", flops / seconds / 1e12)
        if self.peak:
            hub.update_scalar("train/mfu", flops / seconds / 1e12 / self.peak)
        key, gib = peak_memory_gib()
        hub.update_scalar(f"train/{key}", gib)
        if runner.iter > self._first_iter:
            self.tokens, self.seconds, self.flops = self.tokens + sum(lengths), self.seconds + seconds, \
                self.flops + flops

    def before_train_epoch(self, runner) -> None:
        self._first_iter = runner.iter  # also the resumed iteration

    def after_train(self, runner) -> None:
        if not self.seconds:
            return
        tflops = self.flops / self.seconds / 1e12
        mfu = f", MFU {tflops / self.peak:.1%}" if self.peak else ""
        runner.logger.info(f"throughput: {self.tokens / self.seconds:,.0f} tokens/s, {tflops:.3g} TFLOPs "
                           f"per device{mfu}; peak memory {peak_memory_gib()[1]:.2f} GiB")
        runner.message_hub.update_info("throughput", {"tokens_per_sec": self.tokens / self.seconds,
                                                      "tflops": tflops,
                                                      "mfu": tflops / self.peak if self.peak else None},
                                      resumed=False)
