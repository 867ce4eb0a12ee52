"""Writes a benchmark's section of docs/PERFORMANCE.md, between its own markers.

Each CPU benchmark owns one section (`<!-- NAME:start -->` ... `<!-- NAME:end -->`)
and rewrites only that one, so the prose around it survives every run.
"""

from __future__ import annotations

from pathlib import Path

PERFORMANCE_DOC = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"


def write_section(name: str, heading: str, section: str, doc: Path = PERFORMANCE_DOC) -> None:
    """Replaces section `name`; appends it under `heading` when the doc has none yet."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{start}\n{section}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text += f"\n## {heading}\n\n{block}\n"
    doc.write_text(text)
