"""AUTOMATIC1111's prompt syntax: its documented examples, escapes, BREAK, what it forgives."""

from __future__ import annotations

import pytest

from sdxl_service.choices import PromptSyntax
from sdxl_service.engine.prompt_syntax import ChunkBreak, Fragment, PromptPart, parse_prompt


def pairs(parts: list[PromptPart]) -> list[tuple[str, object] | str]:
    return [
        "BREAK" if isinstance(part, ChunkBreak) else (part.text, pytest.approx(part.weight))
        for part in parts
    ]


def a1111(text: str) -> list[tuple[str, object] | str]:
    return pairs(parse_prompt(text, PromptSyntax.A1111))


# The examples in the docstring of A1111's prompt_parser.parse_prompt_attention.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
    ],
)
def test_a1111s_documented_examples(text: str, expected: list[tuple[str, float]]) -> None:
    assert a1111(text) == expected


def test_emphasis_multiplies_and_nests() -> None:
    assert a1111("(cat:1.3)") == [("cat", 1.3)]
    assert a1111("((cat))") == [("cat", 1.21)]
    assert a1111("[cat]") == [("cat", 1 / 1.1)]
    assert a1111("[[cat]]") == [("cat", 1 / 1.21)]
    assert a1111("((a cat:1.5) on a mat)") == [("a cat", 1.65), (" on a mat", 1.1)]
    assert a1111("(cat: 0.5 )") == [("cat", 0.5)]


def test_a_weight_of_one_is_plain_text_merged_with_its_neighbours() -> None:
    assert parse_prompt("a (cat:1.0) sat", PromptSyntax.A1111) == [Fragment("a cat sat")]


def test_escapes_are_literal_brackets_and_backslashes() -> None:
    assert a1111("\\(cat\\) \\[dog\\]") == [("(cat) [dog]", 1.0)]
    assert a1111("a \\\\ b") == [("a \\ b", 1.0)]
    assert a1111("(\\(cat\\))") == [("(cat)", 1.1)]


def test_unbalanced_brackets_are_forgiven() -> None:
    assert a1111("cat)") == [("cat)", 1.0)]
    assert a1111("cat]") == [("cat]", 1.0)]
    assert a1111("[cat") == [("cat", 1 / 1.1)]
    assert a1111("((cat)") == [("cat", 1.21)]
    assert a1111("(cat:1.2.3)") == [("cat:1.2.3)", 1.1)]  # no number: literal, bracket open
    assert a1111("ratio 16:9)") == [("ratio 16:9)", 1.0)]


def test_break_ends_a_chunk_as_an_uppercase_word() -> None:
    assert a1111("a cat BREAK a dog") == [("a cat", 1.0), "BREAK", ("a dog", 1.0)]
    assert a1111("(a cat BREAK a dog)") == [("a cat", 1.1), "BREAK", ("a dog", 1.1)]
    assert a1111("a cat break fast BREAKFAST") == [("a cat break fast BREAKFAST", 1.0)]
    assert a1111("a BREAK BREAK b") == [("a", 1.0), "BREAK", ("", 1.0), "BREAK", ("b", 1.0)]


def test_empty_text_is_one_empty_fragment() -> None:
    assert parse_prompt("", PromptSyntax.A1111) == [Fragment("")]
    assert parse_prompt("", PromptSyntax.NONE) == [Fragment("")]


def test_syntax_none_takes_everything_literally() -> None:
    text = "(cat:1.5) [dog] BREAK \\(bird\\)"
    assert parse_prompt(text, PromptSyntax.NONE) == [Fragment(text)]
