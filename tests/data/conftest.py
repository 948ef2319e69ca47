import pytest


@pytest.fixture
def two_turns():
    """A 2-turn conversation with a system prompt (the golden tests' conversation)."""
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
