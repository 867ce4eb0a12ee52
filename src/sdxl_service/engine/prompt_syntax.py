"""AUTOMATIC1111's prompt syntax: text -> weighted fragments and BREAK markers (no torch).

What SDXL users bring from AUTOMATIC1111's web UI (its `prompt_parser.
parse_prompt_attention`, whose documented examples the tests pin):

- `(word)` multiplies the weight of its text by 1.1, `((word))` by 1.21,
  `[word]` divides by 1.1, `(word:1.3)` sets the multiplier to 1.3;
  nested brackets multiply.
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal brackets and a backslash;
  an unmatched closing bracket is literal; brackets left open at the end
  apply to the rest of the prompt.
- `BREAK` (uppercase, as a word) ends the current 75-token chunk.
- Neighbouring fragments of equal weight merge, so `a (cat:1.0)` is the
  plain text `a cat` and tokenizes as it.

Two departures, both where A1111 misbehaves: a weight that is no number
(`(cat:1.2.3)`) stays literal text instead of raising, and BREAK is a marker
of its own, so two in a row are two chunk ends rather than merging into a
literal "BREAKBREAK" fragment. With `PromptSyntax.NONE` the text is one
literal fragment: no emphasis, no BREAK.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..choices import PromptSyntax

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

# A1111's tokens, in its order: escapes, openers, an explicit weight with its
# closing bracket, closers, plain text, a lone colon.
_TOKENS = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\] | \\\\ | \\
    | \( | \[
    | :\s*([+-]?[.\d]+)\s*\)
    | \) | ]
    | [^\\()\[\]:]+
    | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


@dataclass(frozen=True)
class Fragment:
    """Text whose tokens are all weighted `weight`."""

    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class ChunkBreak:
    """`BREAK`: the tokens after it start a new chunk."""


PromptPart = Fragment | ChunkBreak


def parse_prompt(text: str, syntax: PromptSyntax) -> list[PromptPart]:
    """The prompt's parts as `syntax` reads it; never empty."""
    if syntax is PromptSyntax.NONE:
        return [Fragment(text)]
    return parse_a1111(text)


def parse_a1111(text: str) -> list[PromptPart]:
    """A1111's `parse_prompt_attention`, with BREAK as `ChunkBreak` markers."""
    # Mutable [text, weight] pairs, None for a BREAK: an open bracket
    # multiplies everything from its position when it closes.
    parts: list[list[str | float] | None] = []
    round_opened: list[int] = []
    square_opened: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for part in parts[start:]:
            if part is not None:
                part[1] = float(part[1]) * multiplier

    for match in _TOKENS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            round_opened.append(len(parts))
        elif token == "[":
            square_opened.append(len(parts))
        elif weight is not None and round_opened and _is_number(weight):
            multiply_from(round_opened.pop(), float(weight))
        elif token == ")" and round_opened:
            multiply_from(round_opened.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_opened:
            multiply_from(square_opened.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for index, piece in enumerate(_BREAK.split(token)):
                if index > 0:
                    parts.append(None)
                parts.append([piece, 1.0])

    for start in round_opened:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in square_opened:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)
    return _merged(parts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _merged(parts: list[list[str | float] | None]) -> list[PromptPart]:
    """Neighbouring fragments of equal weight as one; BREAKs kept apart."""
    merged: list[PromptPart] = []
    for part in parts:
        if part is None:
            merged.append(ChunkBreak())
            continue
        text, weight = str(part[0]), float(part[1])
        last = merged[-1] if merged else None
        if isinstance(last, Fragment) and last.weight == weight:
            merged[-1] = Fragment(last.text + text, weight)
        else:
            merged.append(Fragment(text, weight))
    return merged or [Fragment("")]
