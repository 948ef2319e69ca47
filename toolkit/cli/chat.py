"""tk chat MODEL [--adapter DIR]: streaming multi-turn chat in the terminal."""
import sys

from ..assets import EMBEDDED_MODELS
from ..model.meta import read_meta


def chat_defaults(model: str, adapter: str | None) -> dict:
    """Template and system saved with the adapter, else with the model, else the embedded model's own."""
    for folder in (adapter, model):
        meta = read_meta(folder) if folder else {}
        if meta.get("template"):
            return meta
    if model in EMBEDDED_MODELS:
        return {"template": EMBEDDED_MODELS[model].template, "system": EMBEDDED_MODELS[model].system}
    return {}


def run(args) -> int:
    from ..chat.session import ChatSession
    from ..errors import UserError
    from ..model.loader import load_causal_lm, load_tokenizer
    from ..model.merge import load_adapted, pick_device

    defaults = chat_defaults(args.model, args.adapter)
    template = args.prompt_template or defaults.get("template")
    if template is None:
        raise UserError("no prompt template is saved with this model; pass --prompt-template NAME")
    system = args.system if args.system is not None else defaults.get("system")
    device = pick_device("auto")
    if args.adapter:
        model = load_adapted(args.model, args.adapter, device=device)
    else:
        model = load_causal_lm(args.model).to(device)
    tokenizer = load_tokenizer(args.adapter if args.adapter and read_meta(args.adapter) else args.model)
    session = ChatSession(model, tokenizer, template, system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    interactive = sys.stdin.isatty()
    if interactive:
        print("tk chat: type a message; EXIT to quit, RESET to clear the history.")
    while True:
        if interactive:
            print("\n>>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text == "EXIT":
            break
        if text == "RESET":
            session.reset()
            print("(history cleared)")
            continue
        if not text:
            continue
        session.ask(text, on_text=lambda piece: print(piece, end="", flush=True))
        print(flush=True)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal")
    parser.add_argument("model", help="HF folder, hub id or embedded alias (e.g. smollm2-135m-instruct)")
    parser.add_argument("--adapter", help="adapter folder written by tk convert pth_to_hf")
    parser.add_argument("--prompt-template", help="template name (default: the one saved with the model)")
    parser.add_argument("--system", help="system prompt (default: the one saved with the model)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.set_defaults(func=run)
