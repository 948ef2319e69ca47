"""`tk serve` with the embedded SmolLM2, spoken to by the `openai` Python client."""
import openai
import pytest

from toolkit.cli.main import build_parser
from toolkit.cli.serve import is_loopback

MODEL = "smollm2-135m-instruct"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory, servers):
    port = servers.free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with servers.run(["serve", MODEL, "--port", str(port), "--api-key", KEY, "--max-new-tokens", "24"],
                   f"http://127.0.0.1:{port}/v1/models", log):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_completion_answers_and_counts_tokens(client, tokenizer):
    from toolkit.data.encode import prompt_for_generation
    from toolkit.data.templates import get_template
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model=MODEL, messages=question)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop" and answer.choices[0].message.role == "assistant"
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    expected = prompt_for_generation(question, tokenizer, get_template("chatml"), system=system)
    assert answer.usage.prompt_tokens == len(expected)

    history = question + [{"role": "assistant", "content": answer.choices[0].message.content},
                          {"role": "user", "content": "And what is the capital of Germany?"}]
    follow = client.chat.completions.create(model=MODEL, messages=history)
    assert follow.usage.prompt_tokens == len(prompt_for_generation(history, tokenizer, get_template("chatml"),
                                                                   system=system))
    assert "Berlin" in follow.choices[0].message.content


def test_streaming_arrives_in_pieces_that_match_the_whole_answer(client):
    question = [{"role": "user", "content": "Tell me about the sun."}]
    whole = client.chat.completions.create(model=MODEL, messages=question).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=question, stream=True,
                                                 stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 5 and "".join(pieces).strip() == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_request_settings_max_tokens_and_stop(client):
    question = [{"role": "user", "content": "Count from one to ten in words."}]
    short = client.chat.completions.create(model=MODEL, messages=question, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    full = client.chat.completions.create(model=MODEL, messages=question).choices[0].message.content
    word = full.split()[2]
    stopped = client.chat.completions.create(model=MODEL, messages=question, stop=[word])
    assert stopped.choices[0].message.content == full.split(word)[0].strip()


def test_bearer_token_is_enforced(server):
    import json
    import urllib.error
    import urllib.request
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(urllib.error.HTTPError) as no_header:
        urllib.request.urlopen(f"{server}/models")
    assert no_header.value.code == 401
    assert json.load(no_header.value)["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_wrong_model_and_bad_messages_get_clear_errors(client):
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' is not served here; use 'smollm2-135m-instruct'"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="the last message must come from the user"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\].role must be"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])


def test_binds_loopback_unless_told():
    assert build_parser().parse_args(["serve", MODEL]).host == "127.0.0.1"
    assert build_parser().parse_args(["web", MODEL]).host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_a_client_that_leaves_mid_stream_stops_the_generation(tiny_chat_dir, servers, monkeypatch):
    import threading
    import time

    import httpx
    import uvicorn

    import toolkit.chat.stream as stream
    from toolkit.chat.loading import load_chat_model
    from toolkit.chat.server import build_app

    tiny = load_chat_model(tiny_chat_dir)
    steps, stopped_at = [0], []
    check = stream.StopEvent.__call__

    def counting(self, input_ids, scores, **kwargs):  # a step as slow as a real model's on a CPU
        steps[0] += 1
        time.sleep(0.02)
        if self.event.is_set() and not stopped_at:
            stopped_at.append(steps[0])
        return check(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(stream.StopEvent, "__call__", counting)
    port = servers.free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(tiny), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        body = {"model": "tiny-tuned", "stream": True, "max_tokens": 900,
                "messages": [{"role": "user", "content": "Hello"}]}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as reply:
            events = 0
            for line in reply.iter_lines():
                events += line.startswith("data:")
                if events == 3:
                    break
        left_at = steps[0]
        assert tiny.lock.acquire(timeout=60)  # the model is free again...
        tiny.lock.release()
        assert stopped_at and stopped_at[0] - left_at < 100, (left_at, stopped_at, steps)  # ...stopped early
    finally:
        server.should_exit = True
        thread.join(timeout=10)
