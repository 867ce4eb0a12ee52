"""What the benchmarks share about a run: the commit measured, and a part run in a child
process of its own (its memory and its first calls are its own)."""

from __future__ import annotations

import subprocess
import sys

from tests.service_process import REPO


def current_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    return done.stdout.strip()


def run_module(module: str, args: list[str], *, what: str, timeout: float) -> None:
    """`python -m module args` in the repository; RuntimeError with its stderr's end if it
    fails."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-4000:]}")
