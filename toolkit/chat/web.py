"""The Gradio page of ``tk web``: streamed replies, history, system prompt, sampling controls, and with
``--compare`` the same message answered by two models side by side."""
from __future__ import annotations

import os

from .session import ChatSession
from .stream import merge_streams

SETTINGS = ("system", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")


def as_messages(history) -> list:
    """Gradio's chat history (content given as text or as a list of text blocks) -> plain messages."""
    messages = []
    for item in history or []:
        content = item["content"]
        if isinstance(content, list):
            content = "".join(block.get("text", "") for block in content if isinstance(block, dict))
        elif isinstance(content, dict):
            content = content.get("text", "")
        if item["role"] in ("user", "assistant"):
            messages.append({"role": item["role"], "content": str(content)})
    return messages


def respond(models, message: str, histories: list, settings: dict, image: str | None = None):
    """Streams the reply of every model to ``message``: yields the updated histories, one per model.
    ``image`` (a file path) goes with the message as ``Picture 1: <img>path</img>`` (multimodal models)."""
    if image:
        from ..multimodal.chat import picture_prefix
        message = picture_prefix([image]) + message
    histories = [as_messages(h) + [{"role": "user", "content": message}] for h in histories]
    replies = [""] * len(models)
    sessions = [ChatSession(m.model, m.tokenizer, m.template, settings["system"] or None, lock=m.lock,
                            max_new_tokens=int(settings["max_new_tokens"]), temperature=settings["temperature"],
                            top_p=settings["top_p"], top_k=int(settings["top_k"]),
                            repetition_penalty=settings["repetition_penalty"]) for m in models]

    def shown():
        return [h + [{"role": "assistant", "content": r}] for h, r in zip(histories, replies)]

    yield shown()
    works = [lambda on_text, cancel, s=s, h=h: s.reply_to(h, on_text, cancel) for s, h in zip(sessions, histories)]
    for index, piece in merge_streams(works):
        replies[index] += piece
        yield shown()


def build_demo(models, max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               repetition_penalty: float = 1.0):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from ..multimodal.chat import is_multimodal

    names = " vs ".join(m.name for m in models)
    with gr.Blocks(title=f"tk chat: {names}", analytics_enabled=False) as demo:
        gr.Markdown(f"### tk chat · {names}")
        with gr.Row():
            chatbots = [gr.Chatbot(label=m.name, height=420, elem_id=f"chat-{i}", elem_classes=["tk-chat"])
                        for i, m in enumerate(models)]
        with gr.Row():
            box = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=8,
                             elem_id="message", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            stop = gr.Button("Stop", scale=1, min_width=80, elem_id="stop")
            clear = gr.Button("Clear", scale=1, min_width=80, elem_id="clear")
        pictures = []  # a multimodal model gets a picture box: its picture goes with the next message
        if any(is_multimodal(m.model) for m in models):
            pictures.append(gr.Image(type="filepath", label="Picture (sent with the next message)", height=180,
                                     elem_id="picture"))
        with gr.Accordion("System prompt and sampling", open=False):
            system = gr.Textbox(value=models[0].system or "", label="System prompt", elem_id="system")
            with gr.Row():
                controls = [
                    gr.Slider(1, 4096, value=max_new_tokens, step=1, label="Max new tokens"),
                    gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="Temperature (0 = greedy)"),
                    gr.Slider(0.0, 1.0, value=top_p, step=0.01, label="Top-p"),
                    gr.Slider(0, 200, value=top_k, step=1, label="Top-k (0 = off)"),
                    gr.Slider(1.0, 2.0, value=repetition_penalty, step=0.01, label="Repetition penalty"),
                ]

        pending = gr.State("")

        def take(message):
            """Takes the message and locks the box until the reply is complete (nothing typed is lost)."""
            return gr.update(value="", interactive=False), gr.update(interactive=False), message

        def unlock():
            return gr.update(interactive=True), gr.update(interactive=True)

        def submit(message, *values):
            image, values = (values[0] if pictures else None), values[len(pictures):]
            histories, settings = values[:len(models)], dict(zip(SETTINGS, values[len(models):]))
            states = respond(models, message, list(histories), settings, image) if message.strip() else [histories]
            for shown in states:
                yield shown[0] if len(models) == 1 else tuple(shown)  # Gradio: one output is not a list

        streams = []
        for event in (box.submit, send.click):
            streams.append(event(take, box, [box, send, pending], queue=False).then(
                submit, [pending, *pictures, *chatbots, system, *controls], chatbots))
            streams[-1].then(unlock, None, [box, send], queue=False)
            if pictures:
                streams[-1].then(lambda: None, None, pictures, queue=False)  # sent: the box is free again
        stop.click(unlock, None, [box, send], cancels=streams, queue=False)  # what was said so far stays
        clear.click(lambda: [[] for _ in models], None, chatbots)
    return demo


def launch(demo, host: str, port: int | None) -> None:
    import gradio as gr
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    demo.queue().launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                        show_error=True, theme=theme)
