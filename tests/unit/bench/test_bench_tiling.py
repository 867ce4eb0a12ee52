"""make bench-tiling's whole path on the tiny preset's VAE: the full-size run is too heavy
for the suite, its code is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import vae_tiling

pytestmark = pytest.mark.slow


def test_the_tiling_bench_decodes_each_size_both_ways(tmp_path: Path) -> None:
    out = tmp_path / "tiling.json"
    assert vae_tiling.main(["--smoke", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert list(record["sizes"]) == ["64x64", "128x128"]
    small, large = record["sizes"]["64x64"], record["sizes"]["128x128"]
    # One tile (64 px for the tiny VAE) is never split: the same pixels.
    assert small["tiled"]["tiled"] is False and small["pixel_max"] == 0
    # Two tiles a side: decoded in tiles, blended where they overlap.
    assert large["tiled"]["tiled"] is True and large["untiled"]["tiled"] is False
    assert large["pixel_max"] > 0
    for row in record["sizes"].values():
        for mode in ("untiled", "tiled"):
            assert row[mode]["seconds"] > 0 and row[mode]["peak_above_held_gib"] >= 0
