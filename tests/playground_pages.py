"""The playground opened in a browser for a test: a fresh context, and no script error on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def playground_page(browser: Any, root: str, *, width: int = 1100) -> Iterator[Any]:
    """The page of the service at `root` in a fresh browser context (its own storage, so no
    key or job of another test); an error thrown by the page's script fails the test."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(f"{root}/")
        yield page
    finally:
        context.close()
    assert errors == []
