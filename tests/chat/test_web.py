"""`tk web`: the Gradio page in headless Chromium (Debian's chromium + chromedriver, driven by selenium),
the embedded SmolLM2 beside a second model (--compare), replies streamed into the page."""
import shutil
import time

import pytest

from toolkit.chat.loading import load_chat_model
from toolkit.chat.session import ChatSession
from toolkit.chat.web import as_messages, respond

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,900")


def test_respond_streams_every_column_and_sends_the_history(tiny_chat_dir):
    tiny = load_chat_model(tiny_chat_dir)
    settings = dict(system="You are tiny.", max_new_tokens=10, temperature=0.0, top_p=1.0, top_k=0,
                    repetition_penalty=1.0)
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},  # as Gradio hands it back
               {"role": "assistant", "content": "Hello! How can I help?"}]
    states = list(respond([tiny, tiny], "Tell me more", [history, []], settings))
    with_history, without = states[-1]
    assert len(states) >= 4 and len(with_history) == 4 and len(without) == 2
    session = ChatSession(tiny.model, tiny.tokenizer, "chatml", "You are tiny.", max_new_tokens=10)
    assert with_history[-1]["content"].strip() == session.reply_to(as_messages(history) + with_history[2:3])
    assert without[-1]["content"].strip() == session.reply_to(without[:1])
    assert with_history[-1]["content"] != without[-1]["content"]


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver "
                    "(.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={tmp_path / 'chromium-profile'}",):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


RECORD_FIRST_REPLY = """
window.tkSeen = []; window.tkLocked = [];
new MutationObserver(() => {
    const first = document.querySelector('#chat-0 .message.bot');
    const text = first ? first.textContent.trim() : '';
    if (text && window.tkSeen[window.tkSeen.length - 1] !== text) {
        window.tkSeen.push(text);
        window.tkLocked.push(document.querySelector('#message textarea').disabled);
    }
}).observe(document.querySelector('#chat-0'), {subtree: true, childList: true, characterData: true});
"""


def bot_texts(browser, column: int, role: str = "bot") -> list:
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent.trim())",
        f"#chat-{column} .message.{role}")


def idle(browser, column: int) -> bool:
    """Gradio hides a component's status tracker once no event is running for it."""
    return browser.execute_script(
        "const t = document.querySelector(arguments[0]); return !t || t.classList.contains('hide')",
        f"#chat-{column} [data-testid='status-tracker']")


def watch_reply(browser, column: int, count: int, timeout: float = 180) -> list:
    """Every distinct text the column's ``count``-th reply showed, until it was complete."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        texts = bot_texts(browser, column)
        text = texts[count - 1] if len(texts) >= count else None
        if text and (not seen or seen[-1] != text):
            seen.append(text)
        if len(texts) > count or (len(texts) == count and idle(browser, column)):
            return seen + [texts[count - 1]] if texts[count - 1] != (seen or [None])[-1] else seen
        time.sleep(0.05)
    raise AssertionError(f"no finished reply in column {column}; seen {seen}")


def test_page_streams_replies_side_by_side(browser, smollm2_dir, tiny_chat_dir, tmp_path, servers):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    port = servers.free_port()
    args = ["web", "smollm2-135m-instruct", "--compare", tiny_chat_dir, "--port", str(port),
            "--max-new-tokens", "300"]
    with servers.run(args, f"http://127.0.0.1:{port}/", tmp_path / "web.log"):
        browser.get(f"http://127.0.0.1:{port}/")
        deadline = time.time() + 60
        while not browser.find_elements(By.CSS_SELECTOR, "#message textarea") and time.time() < deadline:
            time.sleep(0.2)
        labels = browser.find_element(By.TAG_NAME, "body").text
        assert "smollm2-135m-instruct" in labels and "tiny-tuned" in labels

        browser.execute_script(RECORD_FIRST_REPLY)  # every text the first reply shows, however fast it changes
        box = browser.find_element(By.CSS_SELECTOR, "#message textarea")
        box.send_keys("What is the capital of France?", Keys.ENTER)
        watch_reply(browser, 0, 1)
        seen, locked = browser.execute_script("return [window.tkSeen, window.tkLocked]")
        assert "Paris" in seen[-1]
        growing = [a for a, b in zip(seen, seen[1:]) if b.startswith(a.rstrip()) and len(b) > len(a)]
        assert len(seen) >= 3 and len(growing) >= 2, seen  # the answer arrived in pieces, each adding on
        # the box was locked at every piece before the last (recorded in the page: a poll from here could
        # miss a reply that streamed fast), so nothing typed meanwhile is lost
        assert all(locked[:-1]), (seen, locked)
        deadline = time.time() + 120
        while not (box.is_enabled() and idle(browser, 1)) and time.time() < deadline:
            time.sleep(0.1)
        box.send_keys("And of Germany?", Keys.ENTER)
        watch_reply(browser, 0, 2)
        while not idle(browser, 1) and time.time() < deadline:
            time.sleep(0.1)
        for column in (0, 1):  # the compared model answered the same messages
            assert bot_texts(browser, column, "user") == ["What is the capital of France?", "And of Germany?"]
            assert len(bot_texts(browser, column)) == 2 and all(bot_texts(browser, column))
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000

        box.send_keys("Write a very long story about a dragon and a knight.", Keys.ENTER)
        while len(bot_texts(browser, 0)) < 3 or len(bot_texts(browser, 0)[2].split()) < 5:
            assert time.time() < deadline + 120, "no story started"
            time.sleep(0.05)
        browser.find_element(By.CSS_SELECTOR, "#stop").click()
        while not box.is_enabled():
            assert time.time() < deadline + 150, "the box stayed locked after Stop"
            time.sleep(0.05)
        time.sleep(1)
        stopped = bot_texts(browser, 0)[2]
        time.sleep(3)  # 300 tokens take far longer than this: a reply still running would have grown
        assert stopped and bot_texts(browser, 0)[2] == stopped and len(stopped.split()) < 150

        browser.find_element(By.CSS_SELECTOR, "#clear").click()
        deadline = time.time() + 10
        while (bot_texts(browser, 0) or bot_texts(browser, 1)) and time.time() < deadline:
            time.sleep(0.1)
        assert bot_texts(browser, 0) == [] and bot_texts(browser, 1) == []
