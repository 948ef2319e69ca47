"""Step time of each adapter type against LoRA on a llama-shape model with random weights.

One training step = forward + backward + AdamW step on the adapter weights, batch x seq random tokens.
"host issues it in" is how long the CPU took to launch the step (before the final synchronize). Near the step
time it does not tell a host-bound step from a GPU-bound one: once the GPU's launch queue is full the host
waits on the GPU too. "GPU busy" (CUDA, one more step under torch.profiler: the sum of its kernels' and copies'
device time) does: near the step time, the GPU sets the pace; well under it, the host does.
Default shape: Llama-2-7B (hidden 4096, 32 layers, intermediate 11008, 32 heads), bf16, on CUDA.

    python tools/bench_adapters.py --out results.json                # 7B shape, all methods
    python tools/bench_adapters.py --layers 2 --out smoke.json       # quick smoke run
    python tools/bench_adapters.py --hidden 64 --intermediate 128 --heads 4 --layers 2 --seq 64 \\
        --device cpu --dtype float32 --out cpu.json                   # tiny shape on a CPU
    python tools/bench_adapters.py ... --count-ops                     # + ops / GEMMs / copies one step dispatches
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

METHODS = {
    "lora": dict(r=16, lora_alpha=32, lora_dropout=0.0),
    "vqc": dict(type="vqc", n_qubits=4, n_layers=4, alpha=32),
    "vqc_expval": dict(type="vqc", n_qubits=10, n_layers=10, readout="expval"),
    "tq": dict(type="tq", n_qubits=8, n_layers=2, alpha=16),
    "quanta": dict(type="quanta"),              # dims: --quanta-dims, default 16-8-8-4 at d=4096
}


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                         vocab_size=args.vocab, max_position_embeddings=max(4096, args.seq))
    config._attn_implementation = "sdpa"
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def adapt(model, method, args):
    targets = ["q_proj", "v_proj"]
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(target_modules=targets, task_type="CAUSAL_LM", **METHODS["lora"]))
    from toolkit.model.adapters import apply_adapter
    cfg = dict(METHODS[method], target_modules=targets)
    if method == "quanta":
        cfg["dims"] = args.quanta_dims
    return apply_adapter(model, cfg)


def unadapt(model, method):
    """Put the plain base layers back so the next method starts from the same base model."""
    if method == "lora":
        return model.unload()
    from toolkit.model.adapters.quantum import unload
    return unload(model)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    times, host = [], []

    def step():
        with torch.autocast(device_type=torch.device(args.device).type, dtype=getattr(torch, args.dtype),
                            enabled=args.dtype != "float32"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup + args.steps):
        sync(args.device)
        start = time.perf_counter()
        loss = step()
        issued = time.perf_counter()
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            host.append(issued - start)
    busy = gpu_busy(step, args) if args.device.startswith("cuda") and not args.no_busy else None
    return sorted(times)[len(times) // 2], sorted(host)[len(host) // 2], busy, loss.item()


def gpu_busy(step, args):
    """Seconds of device time (kernels, copies, fills) in one more ``step`` under torch.profiler; None (and a
    line saying why) where the profiler cannot trace the device, so the timing run still completes."""
    from torch.profiler import ProfilerActivity, profile
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync(args.device)
        return busy_seconds(prof.key_averages()) or None
    except Exception as exc:  # noqa: BLE001 - a measurement extra must not lose the run's timings
        print(f"GPU busy not measured: {type(exc).__name__}: {exc}", flush=True)
        return None


def busy_seconds(averages) -> float:
    """The device time of profiler event averages, in seconds: the device's own events (kernels, copies), as
    the profiler table's "Self CUDA time total" counts them (the CPU ops that launched them are not counted)."""
    from torch.autograd import DeviceType
    return sum(event.self_device_time_total for event in averages
               if event.device_type == DeviceType.CUDA and not event.is_user_annotation) / 1e6


def profile_step(model, args, rows: int):
    """One more step under torch.profiler: the ops that take the most device time (what to fix first)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    with profile(activities=activities) as prof:
        with torch.autocast(device_type=torch.device(args.device).type, dtype=getattr(torch, args.dtype),
                            enabled=args.dtype != "float32"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync(args.device)
    key = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)
    model.zero_grad(set_to_none=True)


class OpCounter:
    """Counts what one step dispatches (a TorchDispatchMode): ops that launch work (views excluded), GEMMs,
    and copies (with the bytes they write; "large": 1 MiB or more, i.e. of activations, not of weights or
    gate matrices). Device-independent, so a CPU run counts what a GPU would launch."""
    LARGE = 2 ** 20
    VIEWS = {"view", "t", "_unsafe_view", "detach", "expand", "permute", "transpose", "_reshape_alias", "alias",
             "as_strided", "select", "slice", "unsqueeze", "squeeze", "split", "unbind", "lift_fresh", "_conj",
             "view_as_real", "view_as_complex", "unflatten", "reshape", "mT", "mH", "conj"}
    GEMMS = {"mm", "bmm", "addmm", "baddbmm", "_scaled_mm"}
    COPIES = {"copy_", "clone", "_to_copy", "contiguous", "cat", "stack", "constant_pad_nd"}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self
        self.ops = self.gemms = self.copies = self.copy_bytes = self.large = self.large_bytes = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                if name not in counter.VIEWS:
                    counter.ops += 1
                    counter.gemms += name in counter.GEMMS
                    if name in counter.COPIES and isinstance(out, torch.Tensor):
                        size = out.numel() * out.element_size()
                        counter.copies += 1
                        counter.copy_bytes += size
                        counter.large += size >= counter.LARGE
                        counter.large_bytes += size if size >= counter.LARGE else 0
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def result(self):
        return dict(ops=self.ops, gemms=self.gemms, copies=self.copies, copy_mib=round(self.copy_bytes / 2 ** 20, 1),
                    large_copies=self.large, large_copy_mib=round(self.large_bytes / 2 ** 20, 1))


def count_step(model, args):
    """One forward + backward under :class:`OpCounter` (no optimizer step)."""
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    with OpCounter() as counter:
        with torch.autocast(device_type=torch.device(args.device).type, dtype=getattr(torch, args.dtype),
                            enabled=args.dtype != "float32"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.result()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--quanta-dims", type=lambda s: [int(v) for v in s.split("-")], default=None,
                   help="e.g. 16-8-8-4 (default: 16-8-8-4 at hidden 4096, else ceil(d^(1/4)) x 4)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile one step per method and print the ROWS costliest ops")
    p.add_argument("--no-busy", action="store_true", help="skip the profiled step that measures GPU busy time")
    p.add_argument("--count-ops", action="store_true",
                   help="count the ops, GEMMs and copies (bytes) one forward + backward dispatches, per method")
    args = p.parse_args(argv)
    if args.quanta_dims is None and args.hidden == 4096:
        args.quanta_dims = [16, 8, 8, 4]
    torch.manual_seed(0)
    model = build_model(args)
    results = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                   torch=torch.__version__, settings=vars(args), methods={})
    for method in args.methods.split(","):
        model = adapt(model, method, args)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        step_s, host_s, busy_s, loss = time_steps(model, args)
        if args.profile:
            profile_step(model, args, args.profile)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device.startswith("cuda") else None
        results["methods"][method] = dict(step_s=step_s, host_s=host_s, gpu_busy_s=busy_s,
                                          trainable_params=trainable, peak_mem_gib=peak, loss=loss)
        if args.count_ops:
            counts = results["methods"][method]["dispatched"] = count_step(model, args)
            print(f"{method:11s} one forward+backward dispatches {counts['ops']:,} ops: {counts['gemms']:,} GEMMs, "
                  f"{counts['copies']:,} copies writing {counts['copy_mib']:,.1f} MiB ({counts['large_copies']:,} of "
                  f"1 MiB+ writing {counts['large_copy_mib']:,.1f} MiB)", flush=True)
        model = unadapt(model, method)
        for prm in model.parameters():
            prm.requires_grad_(False)
        print(f"{method:11s} step {step_s * 1000:9.1f} ms  (host issues it in {host_s * 1000:7.1f} ms"
              + (f", GPU busy {busy_s * 1000:7.1f} ms" if busy_s is not None else "") + ")  "
              f"trainable {trainable:>11,d}" + (f"  peak {peak:6.1f} GiB" if peak is not None else ""), flush=True)
    base = results["methods"].get("lora", {}).get("step_s")
    if base:
        print("ratio to LoRA: " + ", ".join(f"{m} {r['step_s'] / base:.2f}x" for m, r in results["methods"].items()))
        for r in results["methods"].values():
            r["ratio_to_lora"] = r["step_s"] / base
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
