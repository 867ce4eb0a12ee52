"""`make examples` against the real service (tiny preset), into a temporary folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "render_examples.py"


def test_render_examples_writes_four_decodable_pngs(service_url: str, tmp_path: Path) -> None:
    out = tmp_path / "examples"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), service_url, "--out", str(out), "--size", "128x128"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr

    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [
        "01-iron_man.png",
        "02-panda.png",
        "03-rick_and_morty.png",
        "04-brad_pitt.png",
    ]
    for png in pngs:
        with Image.open(png) as image:
            image.load()
            assert image.format == "PNG"
            assert image.size == (128, 128)
    gallery = (out / "gallery.md").read_text()
    assert gallery.startswith("> **Not SDXL output**")
    assert gallery.count("![") == 4


def test_render_examples_refuses_to_publish_tiny_renders(service_url: str, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    readme = app / "README.md"
    original = "# Doc\n<!-- examples:start -->\nhow to render\n<!-- examples:end -->\n"
    readme.write_text(original)

    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            service_url,
            "--out",
            str(app / "examples"),
            "--update-readme",
            "--readme",
            str(readme),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 2, result.stderr
    assert "tiny preset" in result.stderr
    assert readme.read_text() == original
    assert not (app / "examples").exists()
