"""Prompts of the embedded tiny model: which digit a text asks for. Pure (no torch), so the
topology loader can reject a prompt the model cannot draw before anything starts."""

from __future__ import annotations

import re

from testbed.errors import InputError

__all__ = ["parse_digit_prompt"]

_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4,
    "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
}


def parse_digit_prompt(prompt: str) -> int:
    """The digit a prompt asks for: 'a handwritten 7', 'seven', 'digit 3' -> 7, 7, 3."""
    text = prompt.lower()
    found = set(re.findall(r"(?<![0-9])[0-9](?![0-9])", text))
    found |= {str(v) for w, v in _WORDS.items() if re.search(rf"\b{w}\b", text)}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits ({', '.join(sorted(found))})"
        raise InputError(
            f"prompt {prompt!r}: the tiny model draws one handwritten digit but the prompt names {what}; "
            "write e.g. 'a handwritten 7' or 'seven'"
        )
    return int(found.pop())
