"""Prompts of the embedded models: the words they know and what a prompt asks for. Pure (no torch),
so the topology loader can reject a prompt a model cannot draw before anything starts.

`tiny` reads `a <colour> <digit> on a <colour> background` (each part optional but the digit):
`tokenize_prompt` turns the words into ids for its learned text encoder, `parse_colour_prompt`
says what the words mean (the digit, ink and background, defaults filled in), which is what
training renders and what tests check. `digits` (the 8x8 model) reads one digit only.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from testbed.errors import InputError

__all__ = [
    "COLOURS",
    "DIGIT_WORDS",
    "FILLER_WORDS",
    "MAX_PROMPT_TOKENS",
    "VOCABULARY",
    "ColourPrompt",
    "check_prompt",
    "parse_colour_prompt",
    "parse_digit_prompt",
    "sample_training_prompt",
    "tokenize_prompt",
]

COLOURS = ("black", "white", "red", "green", "blue", "yellow")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FILLER_WORDS = ("a", "the", "handwritten", "digit", "on", "background")
VOCABULARY = (*FILLER_WORDS, *COLOURS, *(str(d) for d in range(10)), *DIGIT_WORDS)
# token ids: 0 pad, 1 start, 2 end, then the vocabulary in this order (the weights file records it)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_PROMPT_WORDS = 10
MAX_PROMPT_TOKENS = MAX_PROMPT_WORDS + 2
_IDS = {w: i + 3 for i, w in enumerate(VOCABULARY)}
_DIGIT_OF = {**{str(d): d for d in range(10)}, **{w: d for d, w in enumerate(DIGIT_WORDS)}}
_PATTERN = "'a <colour> <digit> on a <colour> background', e.g. 'a red 7 on a white background' or 'a handwritten 7'"


@dataclass(frozen=True)
class ColourPrompt:
    """What a tiny-model prompt asks for; unnamed colours take their defaults (white on black)."""

    digit: int
    ink: str
    background: str


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", prompt.lower())


def tokenize_prompt(prompt: str) -> list[int]:
    """Token ids of a prompt for the tiny model's text encoder: start, words, end, padding
    (MAX_PROMPT_TOKENS). The empty prompt is the unconditional one (classifier-free guidance)."""
    words = _words(prompt)
    if prompt.strip():
        parse_colour_prompt(prompt)  # rejects unknown words and prompts the grammar cannot read
    ids = [BOS_ID, *(_IDS[w] for w in words), EOS_ID]
    return ids + [PAD_ID] * (MAX_PROMPT_TOKENS - len(ids))


def parse_colour_prompt(prompt: str) -> ColourPrompt:
    """'a red 7 on a white background' -> (7, red, white); 'a handwritten 7' -> (7, white, black)."""
    words = _words(prompt)
    unknown = sorted({w for w in words if w not in _IDS})
    if unknown:
        raise InputError(
            f"prompt {prompt!r}: the tiny model does not know {', '.join(map(repr, unknown))}; its vocabulary is "
            f"{' '.join(VOCABULARY)}. Write {_PATTERN}"
        )
    if len(words) > MAX_PROMPT_WORDS:
        raise InputError(f"prompt {prompt!r}: {len(words)} words, the tiny model reads at most {MAX_PROMPT_WORDS}; "
                         f"write {_PATTERN}")
    at = [i for i, w in enumerate(words) if w in _DIGIT_OF]
    if len(at) != 1:
        what = "no digit" if not at else f"{len(at)} digits ({', '.join(words[i] for i in at)})"
        raise InputError(f"prompt {prompt!r}: the tiny model draws one digit but the prompt names {what}; "
                         f"write {_PATTERN}")
    d = at[0]
    before = [w for w in words[:d] if w in COLOURS]
    after = [(i, w) for i, w in enumerate(words) if i > d and w in COLOURS]
    if len(before) > 1 or len(after) > 1 or (after and "on" not in words[d + 1 : after[0][0]]):
        raise InputError(f"prompt {prompt!r}: name at most one ink colour before the digit and one background "
                         f"colour after 'on'; write {_PATTERN}")
    ink = before[0] if before else None
    bg = after[0][1] if after else None
    if ink is None:
        ink = "black" if bg == "white" else "white"
    if bg is None:
        bg = "white" if ink == "black" else "black"
    if ink == bg:
        raise InputError(f"prompt {prompt!r}: ink and background are both {ink}, the digit would be invisible; "
                         "choose two different colours")
    return ColourPrompt(_DIGIT_OF[words[d]], ink, bg)


def sample_training_prompt(rng: random.Random) -> str:
    """A random prompt of the grammar, as training shows them: colours named or left to their
    defaults, the digit as a numeral or a word, optional articles, 'handwritten', 'digit'."""
    digit = rng.randrange(10)
    # a quarter name no colour (white on black): the default prompts and "a handwritten 3" must draw as well
    mention = rng.choices(("both", "ink", "background", "none"), weights=(50, 15, 10, 25))[0]
    ink = rng.choice(COLOURS) if mention in ("both", "ink") else None
    bg = rng.choice([c for c in COLOURS if c != ink]) if mention in ("both", "background") else None
    words: list[str] = []
    if rng.random() < 0.8:
        words.append(rng.choice(("a", "a", "the")))
    if ink:
        words.append(ink)
    if rng.random() < 0.3:
        words.append("handwritten")
    if rng.random() < 0.15:
        words.append("digit")
    words.append(str(digit) if rng.random() < 0.7 else DIGIT_WORDS[digit])
    if bg:
        words.append("on")
        if rng.random() < 0.8:
            words.append(rng.choice(("a", "a", "the")))
        words.append(bg)
        if rng.random() < 0.8:
            words.append("background")
    return " ".join(words)


def parse_digit_prompt(prompt: str) -> int:
    """The digits model's prompt: one digit ('a handwritten 7', 'seven', 'digit 3' -> 7, 7, 3)."""
    text = prompt.lower()
    found = set(re.findall(r"(?<![0-9])[0-9](?![0-9])", text))
    found |= {str(v) for v, w in enumerate(DIGIT_WORDS) if re.search(rf"\b{w}\b", text)}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits ({', '.join(sorted(found))})"
        raise InputError(
            f"prompt {prompt!r}: the digits model draws one handwritten digit but the prompt names {what}; "
            "write e.g. 'a handwritten 7' or 'seven'"
        )
    return int(found.pop())


def check_prompt(model: str, prompt: str) -> None:
    """Raise InputError when an embedded model cannot draw `prompt`; other models take any text."""
    if model == "tiny":
        parse_colour_prompt(prompt)
    elif model == "digits":
        parse_digit_prompt(prompt)
