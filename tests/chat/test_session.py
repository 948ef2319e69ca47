"""ChatSession on the tiny random llama: streaming in pieces, history in the prompt, stop words, seeds,
cancelling, and the settings a chat takes from what tk saved beside the model."""
import threading

import pytest

from toolkit.chat.loading import chat_defaults, load_chat_model, resolve_system
from toolkit.chat.session import ChatSession
from toolkit.chat.stream import StopWordFilter
from toolkit.chat.system_templates import SYSTEM_TEMPLATES
from toolkit.errors import UserError


@pytest.fixture(scope="module")
def tiny(tiny_chat_dir):
    return load_chat_model(tiny_chat_dir, device="cpu")


def session(tiny, **kw):
    kw.setdefault("max_new_tokens", 12)
    return ChatSession(tiny.model, tiny.tokenizer, tiny.template, tiny.system, **kw)


def test_stop_word_filter_cuts_across_pieces_and_holds_back_only_possible_starts():
    words = StopWordFilter(["<eoa>", "END"])
    assert [words.push(p) for p in ["  Hi", " <", "b> E", "N", "D tail"]] == ["Hi", " ", "<b> ", "", ""]
    assert words.stopped and words.flush() == ""
    words = StopWordFilter(["<eoa>"])
    assert words.push("a <e") == "a " and words.flush() == "<e" and not words.stopped


def test_load_chat_model_uses_saved_template_and_system(tiny, tiny_chat_dir):
    assert (tiny.template, tiny.system, tiny.name) == ("chatml", "You are tiny.", "tiny-tuned")
    assert chat_defaults("smollm2-135m-instruct", None)["template"] == "chatml"
    assert chat_defaults(tiny_chat_dir, None)["system"] == "You are tiny."


def test_reply_streams_in_pieces_that_make_the_reply(tiny):
    chat = session(tiny)
    pieces = []
    reply = chat.ask("Hello there", on_text=pieces.append)
    assert len(pieces) >= 2, pieces
    assert "".join(pieces).strip() == reply and reply
    assert chat.usage["completion_tokens"] == 12 and chat.usage["finish_reason"] == "length"


def test_history_is_in_the_next_prompt_and_reset_clears_it(tiny):
    chat = session(tiny)
    first = chat.ask("first question")
    alone = chat.usage["prompt_tokens"]
    chat.ask("second question")
    prompt = tiny.tokenizer.decode(chat.prompt_ids(chat.history[:-1]))
    assert "first question" in prompt and first in prompt and "You are tiny." in prompt
    assert chat.usage["prompt_tokens"] == len(chat.prompt_ids(chat.history[:-1])) > alone
    chat.reset()
    chat.ask("first question")
    assert chat.usage["prompt_tokens"] == alone and len(chat.history) == 2


def test_stream_iterator_updates_history_once_complete(tiny):
    chat = session(tiny)
    pieces = list(chat.stream("Hello there"))
    assert len(pieces) >= 2 and chat.history[-1] == {"role": "assistant", "content": "".join(pieces).strip()}
    assert session(tiny).ask("Hello there") == chat.history[-1]["content"]  # same as the blocking path


def test_extra_stop_word_ends_the_reply_and_the_stream(tiny):
    full = session(tiny, max_new_tokens=20).ask("Hello there")
    words = full.split()
    assert len(words) >= 3, full
    stop = words[len(words) // 2]
    chat = session(tiny, max_new_tokens=20, stop_words=[stop])
    pieces = []
    reply = chat.ask("Hello there", on_text=pieces.append)
    assert reply == full.split(stop)[0].strip()
    assert stop not in "".join(pieces) and chat.usage["completion_tokens"] < 20


def test_seed_makes_sampling_repeatable(tiny):
    def sample(seed):
        return session(tiny, temperature=1.0, top_k=0, seed=seed, max_new_tokens=10).ask("Hello there")
    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_cancel_stops_generation_and_closing_a_stream_ends_its_thread(tiny):
    chat = session(tiny, max_new_tokens=300)
    cancel = threading.Event()
    chat.reply_to([{"role": "user", "content": "Hi"}], on_text=lambda piece: cancel.set(), cancel=cancel)
    assert chat.usage["completion_tokens"] < 20
    before = threading.active_count()
    stream = chat.stream_messages([{"role": "user", "content": "Hi"}])
    next(stream)
    stream.close()
    assert threading.active_count() == before and chat.usage["completion_tokens"] < 300


def test_system_prompt_choice():
    assert resolve_system(None, None, "saved") == "saved"
    assert resolve_system("mine", None, "saved") == "mine"
    assert resolve_system(None, "coder", "saved") == SYSTEM_TEMPLATES["coder"]
    with pytest.raises(UserError, match="unknown system template 'nope'; choose one of: alpaca"):
        resolve_system(None, "nope", None)


def test_mistakes_fail_before_loading_weights(tiny_chat_dir, tmp_path):
    with pytest.raises(UserError, match="unknown prompt template 'nope'"):
        load_chat_model(tiny_chat_dir, template="nope")
    with pytest.raises(UserError, match="not an adapter folder"):
        load_chat_model(tiny_chat_dir, adapter=str(tmp_path))
    with pytest.raises(UserError, match="no prompt template is saved"):
        load_chat_model(str(tmp_path))
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--bits 4 needs a CUDA GPU"):
            load_chat_model(tiny_chat_dir, bits=4)


def test_adapter_is_applied_and_its_saved_template_wins(tiny_chat_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from toolkit.model.meta import write_meta
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    write_meta(tmp_path / "adapter", template="internlm_chat", system="adapter system")
    tuned = load_chat_model(tiny_chat_dir, adapter=str(tmp_path / "adapter"))
    plain = load_chat_model(tiny_chat_dir)
    assert (tuned.template, tuned.system, tuned.name) == ("internlm_chat", "adapter system", "adapter")
    probe = torch.tensor([[1, 4093, 198, 26843, 2]])
    with torch.no_grad():
        assert (tuned.model(probe).logits - plain.model(probe).logits).abs().max() > 1e-3
