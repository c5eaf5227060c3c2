"""Words for messages and log lines: 'an int', '1 round', '3 rounds'."""

from __future__ import annotations

from pathlib import Path

#: What each type is called in messages, with its article.
_NAMES = {bool: "a boolean", int: "an int", float: "a number", str: "a string", Path: "a path (a string)"}


def type_name(kind: type) -> str:
    """'an int', 'a boolean': a type's name for a sentence."""
    if kind in _NAMES:
        return _NAMES[kind]
    name = kind.__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def plural(count: int, noun: str) -> str:
    """'1 round', '3 rounds'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
