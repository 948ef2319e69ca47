"""`tk chat` driven as a user drives it: a real terminal (tmux), typed keys, the screen read back."""
import io
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from toolkit.cli.chat import read_message
from toolkit.cli.main import main

TMUX = shutil.which("tmux")


def test_read_message_multiline_forms():
    lines = iter(["one line", "first \\", "second", '"""', "a", "", "b", '"""', "last", "cut \\"])
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        return next(lines, None)

    got = [read_message(read) for _ in range(6)]
    assert got == ["one line", "first \nsecond", "a\n\nb", "last", "cut ", None]
    assert prompts[:3] == [">>> ", ">>> ", "... "]


def test_piped_chat_prints_whole_replies_with_the_chosen_system_prompt(tiny_chat_dir, capsys, monkeypatch):
    from toolkit.chat.loading import load_chat_model
    from toolkit.chat.session import ChatSession
    from toolkit.chat.system_templates import SYSTEM_TEMPLATES
    tiny = load_chat_model(tiny_chat_dir)
    expected = {system: ChatSession(tiny.model, tiny.tokenizer, "chatml", system, max_new_tokens=8).ask("Hello there")
                for system in (SYSTEM_TEMPLATES["coder"], "You are tiny.")}
    assert len(set(expected.values())) == 2  # the system prompt changes this model's answer

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nEXIT\nnever read\n"))
    assert main(["chat", tiny_chat_dir, "--max-new-tokens", "8", "--no-streamer", "--system-template", "coder"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [expected[SYSTEM_TEMPLATES["coder"]]]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    assert main(["chat", tiny_chat_dir, "--max-new-tokens", "8"]) == 0  # the saved system prompt
    assert capsys.readouterr().out.strip() == expected["You are tiny."]


def test_cli_mistakes_are_one_line(tiny_chat_dir, capsys):
    assert main(["chat", tiny_chat_dir, "--prompt-template", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown prompt template 'nope'" in err[0]
    with pytest.raises(SystemExit) as exc:
        main(["chat", tiny_chat_dir, "--system", "a", "--system-template", "coder"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


class Terminal:
    """A tmux pane on a private server running one command."""

    def __init__(self, name: str, command: str):
        self.server = ["tmux", "-L", f"tk-test-{os.getpid()}-{name}"]
        subprocess.run(self.server + ["new-session", "-d", "-s", "t", "-x", "160", "-y", "60", command], check=True)

    def screen(self) -> str:
        return subprocess.run(self.server + ["capture-pane", "-p", "-S", "-200", "-t", "t"], check=True,
                              capture_output=True, text=True).stdout

    def type(self, *keys: str) -> None:
        for key in keys:
            subprocess.run(self.server + ["send-keys", "-t", "t", "-l", key], check=True)
            subprocess.run(self.server + ["send-keys", "-t", "t", "Enter"], check=True)

    def wait_for(self, predicate, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out; the screen shows:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(self.server + ["kill-server"], capture_output=True)


@pytest.fixture
def terminal():
    if TMUX is None:
        pytest.fail("tmux is needed for this test: apt-get install tmux (.ci/run does)")
    made = []
    yield lambda name, command: made.append(Terminal(name, command)) or made[-1]
    for term in made:
        term.close()


def test_embedded_smollm2_in_a_terminal(terminal, smollm2_dir, tmp_path):
    done = tmp_path / "exit_code"
    cmd = (f"{shlex.quote(sys.executable)} -m toolkit.cli.main chat smollm2-135m-instruct --max-new-tokens 24; "
           f"echo $? > {done}; sleep 600")
    term = terminal("smol", cmd)
    term.wait_for(lambda s: ">>>" in s)
    assert "EXIT quits, RESET clears the history" in term.screen()

    term.type("What is the capital of France?")
    screen = term.wait_for(lambda s: s.count(">>>") == 2)
    assert "Paris" in screen.split("What is the capital of France?")[1]

    term.type("And of Germany? \\", "Answer in one word.")  # a continued line: one message of two lines
    screen = term.wait_for(lambda s: s.count(">>>") == 3)
    answer = screen.split("Answer in one word.")[1]
    assert "... Answer in one word." in screen  # the continuation prompt
    assert "capital" in answer.lower()  # "And of Germany?" names no capital: the model read the history

    term.type("RESET")
    term.wait_for(lambda s: "(history cleared)" in s and s.count(">>>") == 4)
    term.type("EXIT")
    deadline = time.time() + 30
    while not (done.exists() and done.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    assert done.read_text().strip() == "0"
