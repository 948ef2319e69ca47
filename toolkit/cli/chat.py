"""tk chat MODEL [--adapter DIR]: streaming multi-turn chat in the terminal.

Enter sends a message. A line ending in a backslash continues on the next line, and a line of three
double quotes (\"\"\") opens and closes a block of several lines. EXIT quits, RESET clears the history.
"""
import sys
from pathlib import Path


BLOCK = '"""'
HELP = ('tk chat: Enter sends; end a line with \\ to go on, or wrap lines in """; '
        'EXIT quits, RESET clears the history.')


def read_message(read):
    """The next message, or None at the end of input. ``read(prompt)`` returns one line without its
    newline, or None at the end; a trailing backslash and \"\"\" blocks make one message of several lines."""
    line = read(">>> ")
    if line is None:
        return None
    if line.strip() == BLOCK:
        lines = []
        while (more := read("... ")) is not None and more.strip() != BLOCK:
            lines.append(more)
        return "\n".join(lines)
    lines = []
    while line is not None and line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    return "\n".join(lines + ([line] if line is not None else []))


def terminal_read(prompt: str):
    """input() with line editing and history (readline) for a person at a terminal."""
    import readline  # noqa: F401  (importing it turns editing on for input())
    try:
        return input("\n" + prompt if prompt == ">>> " else prompt)
    except EOFError:
        print()
        return None


def piped_read(prompt: str):
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def run(args) -> int:
    from ..chat.loading import load_chat_model
    from ..chat.session import ChatSession
    from ..errors import UserError
    from ..multimodal.chat import is_multimodal, picture_prefix
    from ..multimodal.images import ImageError

    images = list(args.image or [])
    for path in images:
        if not Path(path).expanduser().is_file():
            raise UserError(f"--image {path}: no such file")
    loaded = load_chat_model(args.model, args.adapter, template=args.prompt_template, system=args.system,
                             system_template=args.system_template, bits=args.bits)
    if images and not is_multimodal(loaded.model):
        raise UserError(f"--image: {args.adapter or args.model} has no vision encoder (no tk_multimodal.json); "
                        f"use a folder converted from a multimodal config")
    if args.seed is not None:
        from transformers import set_seed
        set_seed(args.seed)
    session = ChatSession(loaded.model, loaded.tokenizer, loaded.template, loaded.system,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                          stop_words=args.stop_word)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP)
    while (text := read_message(terminal_read if interactive else piped_read)) is not None:
        command = text.strip()
        if command == "EXIT":
            break
        if command == "RESET":
            session.reset()
            print("(history cleared)")
            continue
        if not command:
            continue
        if images:  # the pictures of --image go with the first message
            text, images = picture_prefix(images) + text, []
        try:
            if args.no_streamer:
                print(session.ask(text), flush=True)
            else:
                session.ask(text, on_text=lambda piece: print(piece, end="", flush=True))
                print(flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this reply (it is left out of the history), not the chat
            print("\n(reply stopped)", flush=True)
        except ImageError as exc:  # a picture named in the message: say so and keep chatting
            print(f"tk chat: {exc}", file=sys.stderr, flush=True)
    return 0


def add_model_arguments(parser) -> None:
    """Arguments shared by tk chat, tk web and tk serve."""
    parser.add_argument("model", help="HF folder, hub id or embedded alias (e.g. smollm2-135m-instruct)")
    parser.add_argument("--adapter", help="adapter folder written by tk convert pth_to_hf")
    parser.add_argument("--prompt-template", help="template name (default: the one saved with the adapter/model)")
    system = parser.add_mutually_exclusive_group()
    system.add_argument("--system", help="system prompt (default: the one saved with the model)")
    system.add_argument("--system-template", help="a named system prompt (alpaca, coder, math, sql, ...)")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="load the weights in 4 or 8 bits (CUDA GPU)")


def add_sampling_arguments(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)


def register(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--stop-word", action="append", default=[],
                        help="another string that ends a reply (repeatable; the template's own always apply)")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable sampling")
    parser.add_argument("--no-streamer", action="store_true", help="print each reply whole, not as it is made")
    parser.add_argument("--image", action="append", metavar="PATH",
                        help="a picture for the first message (repeatable; multimodal models). In any message, "
                             "<img>PATH</img> shows the model a picture too")
    parser.set_defaults(func=run)
