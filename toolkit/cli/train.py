"""tk train CFG: train with the mmengine Runner on CPU or GPUs; --deepspeed / --strategy fsdp use the
FlexibleRunner; NPROC_PER_NODE=N starts N processes through torchrun (see engine/launch.py)."""
from ..config import CfgOptions, load_config, validate_config
from ..engine.strategy import PRESETS, apply_strategy, check_flags


def run(args) -> int:
    # The engine (mmengine's runner and hooks, and through them transformers' trainer utilities) is
    # imported here, not at module level: every other tk command starts without it.
    import torch
    from mmengine.dist import is_main_process

    from ..engine import launch, preflight
    from ..engine.runner import adapt_to_device, build_runner, prepare

    check_flags(args.deepspeed, args.strategy)  # one line, before the config's model is prepared
    cfg = load_config(args.config, args.cfg_options)
    validate_config(cfg, check_files=True)
    console_logger(cfg)
    adapt_to_device(cfg)  # settle precision first: the DeepSpeed/FSDP settings read the optim wrapper
    apply_strategy(cfg, deepspeed=args.deepspeed, strategy=args.strategy)  # bad flags fail before launching
    code = launch.relaunch(getattr(args, "argv", None) or [])
    if code is not None:
        return code
    if args.deepspeed or args.strategy:
        launch.single_process_group_env()
    prepare(cfg, work_dir=args.work_dir, resume=args.resume, seed=args.seed, config_path=args.config)
    datasets = preflight.build_datasets(cfg)  # a data mistake is reported before the work dir is made
    preflight.check_work_dir(cfg.work_dir)
    runner = build_runner(cfg)
    preflight.hand_to_runner(runner, datasets)
    # the FlexibleRunner builds the model only in train(); a run without checkpoints needs no room for one
    if is_main_process() and isinstance(runner.model, torch.nn.Module) and preflight.saves_checkpoints(cfg):
        preflight.check_free_space(runner.work_dir, preflight.checkpoint_bytes(runner.model))
    runner.train()
    if is_main_process():
        print(f"tk train: done; checkpoints and logs in {runner.work_dir}")
    return 0


def console_logger(cfg) -> None:
    """What is logged before the runner makes its own logger (precision, data) goes to this console, not to
    a logger an earlier run in this process left behind (its stream may be closed, its log file another's)."""
    import uuid

    from mmengine.logging import MMLogger
    MMLogger.get_instance(f"tk-train-{uuid.uuid4().hex[:8]}", log_level=cfg.get("log_level", "INFO"))


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train from a config")
    parser.add_argument("config", help="config file or shipped config name")
    parser.add_argument("--work-dir", help="where checkpoints and logs go (default work_dirs/CONFIG_NAME)")
    parser.add_argument("--cfg-options", nargs="+", action=CfgOptions, metavar="KEY=VALUE",
                        help="override config settings, e.g. train_cfg.max_epochs=1")
    parser.add_argument("--resume", metavar="PATH|auto", help="resume from a checkpoint, or the latest one")
    parser.add_argument("--seed", type=int, help="random seed (each rank of a multi-GPU run adds its rank)")
    parser.add_argument("--deepspeed", metavar="|".join(PRESETS) + "|FILE.json",
                        help="train with DeepSpeed ZeRO; \"auto\" fields are filled from the config")
    parser.add_argument("--strategy", choices=("fsdp",), help="train with PyTorch FSDP instead of DeepSpeed")
    parser.set_defaults(func=run)
