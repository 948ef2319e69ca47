"""tk web MODEL [--adapter DIR] [--compare BASE]: a chat page in the browser (Gradio), replies streamed."""
import sys

from .chat import add_model_arguments, add_sampling_arguments


def run(args) -> int:
    from ..chat.loading import chat_defaults, load_chat_model
    from ..chat.web import build_demo, launch
    from .serve import is_loopback

    if not is_loopback(args.host):
        print(f"tk web: warning: {args.host} lets other machines use this page (it has no login)", file=sys.stderr)

    models = [load_chat_model(args.model, args.adapter, template=args.prompt_template, system=args.system,
                              system_template=args.system_template, bits=args.bits)]
    if args.compare:
        template = args.compare_template or chat_defaults(args.compare, None).get("template") or models[0].template
        base = load_chat_model(args.compare, template=template, system=models[0].system, bits=args.bits)
        if base.name == models[0].name:
            models[0].name, base.name = f"tuned: {models[0].name}", f"base: {base.name}"
        models.append(base)
    demo = build_demo(models, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    launch(demo, args.host, args.port)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("web", help="chat with a model (or compare two) in the browser")
    add_model_arguments(parser)
    parser.add_argument("--compare", metavar="BASE", help="a second model answering the same messages beside it")
    parser.add_argument("--compare-template", help="template for BASE (default: the first model's)")
    add_sampling_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.set_defaults(func=run)
