"""make bench's service variants: the fixed-wait policy overlay still fits the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.run_cpu import fixed_wait_overlay

PROBE = """
from sdxl_service.render import batch_policy
from tests.jobs import make_params

class Item:
    def __init__(self, at):
        self.enqueued_at = at
        self.batch_key = batch_policy.BatchKey(make_params())

# A lone image with no recent demand: the current policy sends it at once; the
# fixed wait of old holds it for company until wait_s after it arrived.
batch, wait = batch_policy.next_batch(
    [Item(10.0)], max_images=8, wait_s=0.5, now=10.1, demand=batch_policy.Demand()
)
print(len(batch), round(wait, 3), batch_policy.__file__)
"""


def test_the_fixed_wait_overlay_replaces_the_policy_of_the_package(tmp_path: Path) -> None:
    env = fixed_wait_overlay(tmp_path)
    repo = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=repo,
        env={"PYTHONPATH": f"{env['PYTHONPATH']}:{repo}"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    count, wait, path = done.stdout.split()
    assert (count, wait) == ("0", "0.4")
    assert path.startswith(str(tmp_path))
