"""tk serve MODEL [--adapter DIR]: an OpenAI-compatible chat API (/v1/chat/completions, /v1/models)."""
import ipaddress
import os
import sys

from .chat import add_model_arguments, add_sampling_arguments


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args) -> int:
    from ..chat.loading import load_chat_model
    from ..chat.server import build_app

    api_key = args.api_key or os.environ.get("TK_API_KEY") or None
    if not is_loopback(args.host) and api_key is None:
        print(f"tk serve: warning: {args.host} is reachable from other machines and no --api-key is set",
              file=sys.stderr)
    loaded = load_chat_model(args.model, args.adapter, template=args.prompt_template, system=args.system,
                             system_template=args.system_template, bits=args.bits, name=args.model_name)
    app = build_app(loaded, api_key=api_key, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    import uvicorn
    print(f"tk serve: model {loaded.name!r} at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve a model through an OpenAI-compatible API")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--model-name", help="the model id clients ask for (default: the folder or alias name)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set TK_API_KEY)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.set_defaults(func=run)
