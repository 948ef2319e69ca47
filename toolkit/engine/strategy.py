"""DeepSpeed ZeRO and FSDP for ``tk train``: turn a config into one for mmengine's ``FlexibleRunner``.

``--deepspeed zero2`` picks ``configs/deepspeed/zero2.json`` (or a JSON file of the user's); its "auto"
fields are filled from the config, so batch size, accumulation, clipping and precision are written once:

| DeepSpeed field                   | taken from                                        |
| --------------------------------- | ------------------------------------------------- |
| train_micro_batch_size_per_gpu    | train_dataloader.batch_size                        |
| gradient_accumulation_steps       | optim_wrapper.accumulative_counts (1)             |
| gradient_clipping                 | optim_wrapper.clip_grad.max_norm (0: no clipping) |
| bf16.enabled / fp16.enabled       | AmpOptimWrapper's dtype (fp32 without it)         |
| zero_optimization.                | one transformer block's parameter count where     |
|   stage3_prefetch_bucket_size     | ZeRO-3 fetches compiled blocks whole, else 5e7    |
| communication_data_type           | the gradients' precision: bf16 / fp16 where the   |
|                                   | filled JSON enables it, else bf16 for weights     |
|                                   | loaded in bf16, else fp32                         |

The prefetch bucket serves whole-block fetch (:mod:`toolkit.model.zero3_blocks`): DeepSpeed prefetches the next
weights only up to its size, which at 5e7 leaves most of a 7B block (202M) to be gathered when the block starts.

Full fine-tuning of weights loaded in bf16 trains them with the plain wrapper (``runner.adapt_to_device``), so
DeepSpeed's own bf16 mode is off and it would reduce the bf16 gradients in fp32 (its default without bf16 or
fp16): every gradient cast to fp32 and twice the bytes through the reduce-scatter. "auto" reduces them in
bf16, as DeepSpeed's bf16 mode and FSDP's bf16 mixed precision do; each rank's partition is still
accumulated and stepped in fp32.
"""
from __future__ import annotations

import json
from pathlib import Path

from mmengine.config import Config

from ..errors import UserError
from ..paths import configs_root

PRESETS = ("zero1", "zero2", "zero2_offload", "zero3", "zero3_offload")


def deepspeed_json(name_or_path: str) -> dict:
    """A shipped preset by name, or a user's JSON file."""
    if name_or_path in PRESETS:
        path = configs_root() / "deepspeed" / f"{name_or_path}.json"
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"--deepspeed {name_or_path}: neither a preset ({', '.join(PRESETS)}) "
                            f"nor an existing JSON file; use a preset or check the path")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def _precision(cfg: Config) -> str:
    """'bf16', 'fp16' or 'fp32', from the config's optim_wrapper."""
    wrapper = cfg.optim_wrapper
    kind = wrapper.get("type")
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
    if kind != "AmpOptimWrapper":
        return "fp32"
    dtype = str(wrapper.get("dtype") or "float16")
    return "bf16" if "bf" in dtype else "fp16"


PREFETCH_DEFAULT = 50_000_000  # DeepSpeed's own default for stage3_prefetch_bucket_size


def _whole_blocks(cfg: Config) -> bool:
    """Whether the model ``cfg`` builds has its compiled blocks fetched whole under ZeRO-3 (the model's rule)."""
    from ..model.zero3_blocks import fetches_whole_blocks
    model = cfg.get("model") or {}
    llm = model.get("llm") or {}
    quantized = isinstance(llm, dict) and llm.get("quantization_config") is not None
    return fetches_whole_blocks(model.get("compile", False), model.get("adapter"),
                                bool(model.get("offload_activations", False)), quantized)


def _prefetch_bucket(cfg: Config) -> int:
    """``stage3_prefetch_bucket_size`` for "auto": the largest block's parameter count where blocks are fetched
    whole (so DeepSpeed gathers the next block while this one computes; it also keeps the gathered weights under
    ``stage3_max_live_parameters``, 1e9 in the preset, which caps this for blocks above 5e8), DeepSpeed's 5e7
    otherwise, and where the model's config.json cannot be read here (a hub id, a loader of the user's): a
    speed setting, so that is a warning, and loading the model reports what is wrong with it."""
    if not _whole_blocks(cfg):
        return PREFETCH_DEFAULT
    from ..model.zero3_blocks import largest_block_numel
    llm = cfg.model.get("llm")
    try:
        return max(PREFETCH_DEFAULT, largest_block_numel(llm if isinstance(llm, dict) else {}))
    except (ValueError, OSError, ImportError, UserError) as exc:
        from mmengine.logging import print_log
        print_log(f"zero_optimization.stage3_prefetch_bucket_size \"auto\": {exc}, so it is DeepSpeed's "
                  f"{PREFETCH_DEFAULT:.0e}; write the parameter count of one block there to prefetch whole blocks",
                  logger="current", level=30)
        return PREFETCH_DEFAULT


def _communication_dtype(cfg: Config, filled: dict) -> str:
    """DeepSpeed's ``communication_data_type`` for "auto": the precision the gradients are made in, read from the
    filled JSON's own bf16/fp16 switches (a user's JSON may set them), else bf16 for weights loaded in bf16."""
    from .runner import _half_precision_weights
    if (filled.get("bf16") or {}).get("enabled"):
        return "bf16"
    if (filled.get("fp16") or {}).get("enabled"):
        return "fp16"
    return "bf16" if _half_precision_weights(cfg) == "bfloat16" else "fp32"


def _settings(cfg: Config) -> dict:
    """The values tk fills for "auto", by dotted key; a callable is called only where its key says "auto"."""
    wrapper = cfg.optim_wrapper
    clip = wrapper.get("clip_grad") or {}
    precision = _precision(cfg)
    return {"train_micro_batch_size_per_gpu": int(cfg.train_dataloader.batch_size),
            "gradient_accumulation_steps": int(wrapper.get("accumulative_counts", 1)),
            "gradient_clipping": float(clip.get("max_norm", 0.0)),
            "bf16.enabled": precision == "bf16",
            "fp16.enabled": precision == "fp16",
            "zero_optimization.stage3_prefetch_bucket_size": lambda: _prefetch_bucket(cfg),
            "communication_data_type": None}  # filled last, from the filled precision (_communication_dtype)


def fill_auto(ds: dict, cfg: Config, source: str = "deepspeed config") -> dict:
    """A copy of ``ds`` with every "auto" value filled from ``cfg``; an "auto" tk cannot fill is an error."""
    settings = _settings(cfg)

    def walk(node, prefix):
        out = {}
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                out[key] = walk(value, dotted + ".")
            elif value == "auto":
                if dotted not in settings:
                    raise UserError(f"{source}: tk cannot fill \"{dotted}\": \"auto\"; write a value instead "
                                    f"(tk fills {', '.join(settings)})")
                out[key] = settings[dotted]() if callable(settings[dotted]) else settings[dotted]
            else:
                out[key] = value
        return out

    filled = walk(ds, "")
    for half in ("bf16", "fp16"):  # a precision section left without "enabled" follows the config too
        if half in filled and "enabled" not in filled[half]:
            filled[half]["enabled"] = settings[f"{half}.enabled"]
    if ds.get("communication_data_type") == "auto":
        filled["communication_data_type"] = _communication_dtype(cfg, filled)
    return filled


def use_deepspeed(cfg: Config, name_or_path: str) -> dict:
    """Switch ``cfg`` to FlexibleRunner + DeepSpeedStrategy; returns the filled DeepSpeed config."""
    ds = fill_auto(deepspeed_json(name_or_path), cfg, source=f"--deepspeed {name_or_path}")
    _torch_linear_for_whole_blocks(ds, cfg)
    cfg.strategy = dict(type="DeepSpeedStrategy", config=ds,
                        # adapter runs save (and convert reads) only the trained weights
                        exclude_frozen_parameters=True)
    cfg.optim_wrapper = dict(type="DeepSpeedOptimWrapper", optimizer=cfg.optim_wrapper.optimizer)
    cfg.runner_type = "FlexibleRunner"
    return ds


def _torch_linear_for_whole_blocks(ds: dict, cfg: Config) -> None:
    """ZeRO-3 where the model's compiled blocks are fetched whole (:func:`toolkit.model.zero3_blocks.fetches_whole_blocks`):
    keep torch's ``F.linear`` (``memory_efficient_linear: false``) unless the user's JSON says otherwise, so each
    block compiles as one graph; DeepSpeed's replacement linear would break it at every projection."""
    zero = ds.get("zero_optimization") or {}
    if zero.get("stage") == 3 and _whole_blocks(cfg):
        zero.setdefault("memory_efficient_linear", False)


def use_fsdp(cfg: Config) -> None:
    """Switch ``cfg`` to FlexibleRunner + FSDPStrategy: full sharding in units of >= 10M parameters,
    the precision of the config's AmpOptimWrapper, and a full (rank-0) state dict in checkpoints so
    ``tk convert pth_to_hf`` reads them like any other."""
    import torch
    if not torch.cuda.is_available():  # mmengine's FSDP support puts each rank on its CUDA device
        raise UserError("--strategy fsdp needs CUDA GPUs; on a CPU train without it (or with --deepspeed)")
    from mmengine.registry import FUNCTIONS
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy
    # by name, so the config stays dumpable as text
    FUNCTIONS.register_module(name="size_based_auto_wrap_policy", module=size_based_auto_wrap_policy, force=True)
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(_precision(cfg))
    wrapper = dict(type="MMFullyShardedDataParallel", use_orig_params=True,
                   auto_wrap_policy=dict(type="size_based_auto_wrap_policy", min_num_params=int(1e7)))
    if dtype:
        wrapper["mixed_precision"] = dict(param_dtype=dtype, reduce_dtype="float32", buffer_dtype=dtype)
    cfg.strategy = dict(type="FSDPStrategy", model_wrapper=wrapper, state_dict_cfg="full")
    optim = cfg.optim_wrapper
    cfg.optim_wrapper = dict(type="OptimWrapper", optimizer=optim.optimizer,
                             accumulative_counts=optim.get("accumulative_counts", 1))
    if optim.get("clip_grad"):  # mmengine clips with torch's clip_grad_norm_, which sees only this rank's shard
        from mmengine.logging import print_log
        print_log("--strategy fsdp: gradient clipping is off (mmengine's FSDP support would clip each shard on "
                  "its own); use --deepspeed for clipped training", logger="current", level=30)
    cfg.runner_type = "FlexibleRunner"


def check_flags(deepspeed: str | None = None, strategy: str | None = None) -> None:
    """One-line UserError for strategy flags that cannot work: both at once, a --deepspeed that is neither a
    preset nor a readable JSON file, or a bad ``TK_ZERO_NORM``. ``tk train`` calls it before it reads the config
    or prepares a model (so before torchrun starts the workers that would each stop on it)."""
    if deepspeed and strategy == "fsdp":
        raise UserError("--deepspeed and --strategy fsdp exclude each other; choose one")
    if deepspeed:
        from .deepspeed_norms import wants_fp32
        deepspeed_json(deepspeed)
        wants_fp32()


def apply_strategy(cfg: Config, deepspeed: str | None = None, strategy: str | None = None) -> None:
    check_flags(deepspeed, strategy)
    if deepspeed:
        use_deepspeed(cfg, deepspeed)
    elif strategy == "fsdp":
        use_fsdp(cfg)


def register_deepspeed_optimizers() -> list:
    """mmengine 0.10.7's own registration imports ``deepspeed.runtime.fp16.onebit``, which newer DeepSpeed
    releases (0.17+) no longer have; tk registers the optimizers that exist and puts this in its place."""
    from mmengine._strategy import deepspeed as mm_deepspeed
    from mmengine.registry import OPTIMIZERS
    names = []
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    except ImportError:
        return names
    for optimizer in (DeepSpeedCPUAdam, FusedAdam):
        OPTIMIZERS.register_module(module=optimizer, force=True)
        names.append(optimizer.__name__)
    mm_deepspeed.register_deepspeed_optimizers = register_deepspeed_optimizers
    return names


def load_zero_checkpoint(path) -> dict:
    """The trained weights of a DeepSpeed checkpoint folder (``iter_N.pth/``), consolidated from every
    rank's ZeRO partitions (stage 1, 2 or 3) in fp32; loading into the model casts them to its dtype."""
    path = Path(path)
    if not any(path.glob("*model_states.pt")):
        raise UserError(f"{path}: a folder without DeepSpeed model states (*model_states.pt); "
                        f"give an iter_N.pth checkpoint written by a --deepspeed run")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise UserError(f"{path} is a DeepSpeed checkpoint; reading it needs DeepSpeed "
                        f"(pip install -e \".[deepspeed]\")") from None
    # DeepSpeed's own reader unpickles its optimizer files (they hold DeepSpeed objects, so
    # weights_only cannot load them): read only checkpoints you or your runs wrote.
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name,
                                                     exclude_frozen_parameters=True)
    return {key.removeprefix("module."): value for key, value in state.items()}
