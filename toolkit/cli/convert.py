"""tk convert pth_to_hf | merge."""
from ..config import load_config


def run_pth_to_hf(args) -> int:
    from ..model.export import pth_to_hf
    from ..multimodal.export import is_multimodal_config, pth_to_hf_multimodal
    cfg = load_config(args.config)
    convert = pth_to_hf_multimodal if is_multimodal_config(cfg) else pth_to_hf
    out = convert(cfg, args.checkpoint, args.out, force=args.force)
    print(f"saved to {out}")
    return 0


def run_merge(args) -> int:
    from ..model.merge import merge
    from ..multimodal.export import merge_multimodal, multimodal_folder
    merge = merge_multimodal if multimodal_folder(args.adapter) else merge
    out = merge(args.base, args.adapter, args.out, device=args.device, max_shard_size=args.max_shard_size,
                dtype=args.dtype, force=args.force)
    print(f"merged model saved to {out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("convert", help="convert checkpoints and merge adapters")
    sub = parser.add_subparsers(dest="conversion", metavar="CONVERSION", required=True)
    p = sub.add_parser("pth_to_hf", help="training checkpoint -> HF adapter (or model) folder")
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=run_pth_to_hf)
    m = sub.add_parser("merge", help="merge an adapter into its base model")
    m.add_argument("base", help="base model: HF folder, hub id or embedded alias")
    m.add_argument("adapter", help="adapter folder from pth_to_hf")
    m.add_argument("out")
    m.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    m.add_argument("--max-shard-size", default="5GB")
    m.add_argument("--dtype", default="auto", help="auto (the base's), float32, bfloat16, float16")
    m.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    m.set_defaults(func=run_merge)
