"""Checks shared by the format map fns."""

ROLES = ("system", "user", "assistant")


class FormatError(ValueError):
    """A record that does not fit its format; the dataset builder adds the record index."""


def _field(record: dict, key: str):
    if not isinstance(record, dict):
        raise FormatError(f"expected an object with field '{key}', got {type(record).__name__}")
    if key not in record or record[key] is None:
        raise FormatError(f"missing field '{key}'")
    return record[key]


def require_str(record: dict, key: str, *, allow_empty: bool = False) -> str:
    value = _field(record, key)
    if not isinstance(value, str):
        raise FormatError(f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise FormatError(f"field '{key}' is empty")
    return value


def require_list(record: dict, key: str) -> list:
    """A non-empty list field (an empty one is 'the conversation is empty')."""
    value = _field(record, key)
    if not isinstance(value, list):
        raise FormatError(f"field '{key}' must be a list, got {type(value).__name__}")
    if not value:
        raise FormatError(f"the conversation is empty (field '{key}' is [])")
    return value


def check_messages(messages) -> list:
    """Validate a unified message list: roles, string contents, at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise FormatError("the conversation is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise FormatError(f"message {i} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise FormatError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise FormatError(f"message {i} ({role}) needs a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise FormatError("the conversation has no assistant message to train on")
    return messages
