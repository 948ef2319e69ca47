"""Chatting with pictures: the session puts the picture's tokens in the prompt; the web page has a picture box."""
import pytest
import torch

from toolkit.chat.loading import ChatModel
from toolkit.chat.session import ChatSession
from toolkit.multimodal.data import IMAGE_TOKEN_ID
from toolkit.multimodal.model import LlavaFinetune

from mm_helpers import image_folder  # noqa: F401  (fixtures)


@pytest.fixture
def chat_model(tiny_llama_dir, tokenizer):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = LlavaFinetune(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), image_size=64).eval()
    return ChatModel(name="tiny-mm", model=model, tokenizer=tokenizer, template="chatml", system=None)


def test_the_prompt_holds_each_pictures_tokens_and_the_reply_follows(chat_model, image_folder, monkeypatch):
    monkeypatch.chdir(image_folder)  # chat paths are the user's: relative to the working directory
    session = ChatSession(chat_model.model, chat_model.tokenizer, "chatml", max_new_tokens=4)
    text = "Picture 1: <img>img/red.png</img>\nPicture 2: <img>img/blue.png</img>\nSame?"
    messages = [{"role": "user", "content": text}]
    ids, extra = session.prompt_inputs(messages)
    assert ids.count(IMAGE_TOKEN_ID) == 2 * chat_model.model.image_tokens
    assert extra["pixel_values"].shape == (2, 3, 64, 64)
    assert extra["pixel_values"][1, 2, 32, 32] == 220  # the second picture is the blue one
    reply = session.ask(messages[0]["content"])
    assert session.usage["prompt_tokens"] == len(ids) and session.usage["completion_tokens"] >= 1
    assert session.history[-1] == {"role": "assistant", "content": reply}


def test_the_web_page_sends_the_picture_with_the_message(chat_model, image_folder):
    from toolkit.chat.web import build_demo, respond
    settings = dict(system="", max_new_tokens=3, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    picture = str(image_folder / "img" / "green.png")
    (history,) = list(respond([chat_model], "What colour?", [[]], settings, image=picture))[-1]
    assert history[0] == {"role": "user", "content": f"Picture 1: <img>{picture}</img>\nWhat colour?"}
    demo = build_demo([chat_model])
    assert any(getattr(block, "elem_id", None) == "picture" for block in demo.blocks.values())
