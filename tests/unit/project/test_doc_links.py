"""Every relative link of README.md and docs/*.md leads somewhere.

A link to a file must name one that exists (relative to the page, as GitHub
resolves it); a `#anchor` into a markdown page must name one of its headings, by
GitHub's slug rules. Web addresses are not followed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
CODE_SPAN = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target), the target up to whitespace or the closing bracket
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[^)]*)?\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, ...


def prose_lines(text: str) -> list[str]:
    """The page's lines outside fenced code blocks (a `# comment` there is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lowercased, punctuation dropped, spaces -> -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "")
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis markers, not snake_case
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and _ of any script
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's slug, repeated headings numbered -1, -2, ... as GitHub does."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def links(page: Path) -> list[str]:
    found = []
    for line in prose_lines(page.read_text()):
        definition = REFERENCE_DEFINITION.match(line)
        if definition:
            found.append(definition.group(1))
            continue
        found.extend(INLINE_LINK.findall(CODE_SPAN.sub("", line)))
    return found


def broken_links(page: Path, repo: Path = REPO) -> list[str]:
    """The links of one page that lead nowhere, each with the reason."""
    broken = []
    for link in links(page):
        if not link or EXTERNAL.match(link):
            continue
        path, _, anchor = link.partition("#")
        if path.startswith("/"):
            target = repo / path.lstrip("/")
        else:
            target = (page.parent / path) if path else page
        if not target.exists():
            broken.append(f"{link}: no file {os.path.relpath(target, repo)}")
            continue
        if anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page() -> None:
    readme = set(links(REPO / "README.md"))
    unlinked = [page.name for page in PAGES[1:] if f"docs/{page.name}" not in readme]
    assert unlinked == []


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Run it", "run-it"),
        ("openai (current, 1.x \N{EN DASH} 3.x)", "openai-current-1x--3x"),  # the dash dropped
        (
            "Image jobs: answered at once, in the background",
            "image-jobs-answered-at-once-in-the-background",
        ),
        ("Live previews: cost (CPU, tiny preset)", "live-previews-cost-cpu-tiny-preset"),
        ("BentoML 1.4.40 workarounds", "bentoml-1440-workarounds"),
        ("`SDXL_VAE` and *your* own VAE", "sdxl_vae-and-your-own-vae"),
        ("[Webhooks](https://www.standardwebhooks.com)", "webhooks"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "OTHER.md").write_text("# Other\n\n## A section\n\n## A section\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Page\n\n## Here\n\n"
        "[ok](docs/OTHER.md#a-section) [ok](docs/OTHER.md#a-section-1) [ok](#here)\n"
        "[web](https://example.com/missing) `[code](missing.md)`\n"
        "[gone](docs/MISSING.md) [bad](docs/OTHER.md#no-such) [bad](#nowhere)\n"
        "```\n[in a fence](fenced.md)\n```\n"
        "[ref]: docs/ALSO_MISSING.md\n"
    )
    assert broken_links(page, tmp_path) == [
        "docs/MISSING.md: no file docs/MISSING.md",
        "docs/OTHER.md#no-such: no heading #no-such in OTHER.md",
        "#nowhere: no heading #nowhere in README.md",
        "docs/ALSO_MISSING.md: no file docs/ALSO_MISSING.md",
    ]
