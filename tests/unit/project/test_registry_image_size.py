"""scripts/registry_image_size.sh, on a copy of the manifest, without a docker engine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "registry_image_size.sh"
MANIFEST = REPO / "registry" / "diffuser-stable-diffusion-xl-with-refiner" / "manifest.json"
SCHEMA = REPO / "registry" / "schema" / "manifest.schema.json"
IMAGE = "ghcr.io/premai-io/diffuser-stable-diffusion-xl-with-refiner-gpu:9.9.9"


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    copy = tmp_path / "manifest.json"
    shutil.copy(MANIFEST, copy)
    return copy


def _run(
    *args: str, image_size: str | None = None, path_prefix: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("IMAGE_SIZE", None)
    if image_size is not None:
        env["IMAGE_SIZE"] = image_size
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_overridden_size_and_image_are_written(manifest: Path) -> None:
    before = json.loads(manifest.read_text())

    result = _run(IMAGE, str(manifest), image_size="8123456789")

    assert result.returncode == 0, result.stderr
    after = json.loads(manifest.read_text())
    assert after["dockerImages"]["gpu"] == {"size": 8123456789, "image": IMAGE}
    # Nothing else moves, the key order included.
    before["dockerImages"]["gpu"] = after["dockerImages"]["gpu"]
    assert list(after) == list(before) and after == before
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(after)


def test_rewrite_keeps_the_committed_formatting(manifest: Path) -> None:
    committed = json.loads(MANIFEST.read_text())["dockerImages"]["gpu"]

    result = _run(committed["image"], str(manifest), image_size=str(committed["size"]))

    assert result.returncode == 0, result.stderr
    assert manifest.read_text() == MANIFEST.read_text()


def test_size_comes_from_docker_inspect(manifest: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_docker = bin_dir / "docker"
    # Answers only the exact call the script must make.
    fake_docker.write_text(
        "#!/usr/bin/env bash\n"
        f'[[ "$*" == "inspect -f {{{{.Size}}}} {IMAGE}" ]] || {{ echo "bad: $*" >&2; exit 1; }}\n'
        "echo 7654321000\n"
    )
    fake_docker.chmod(0o755)

    result = _run(IMAGE, str(manifest), path_prefix=bin_dir)

    assert result.returncode == 0, result.stderr
    assert json.loads(manifest.read_text())["dockerImages"]["gpu"]["size"] == 7654321000


@pytest.mark.parametrize(
    ("image", "size"),
    [
        ("ghcr.io/premai-io/x-gpu", "100"),
        ("ghcr.io/premai-io/x-gpu:latest", "100"),
        (IMAGE, "0"),
        (IMAGE, "47 GB"),
        (IMAGE, "-5"),
    ],
)
def test_bad_input_leaves_the_manifest_alone(manifest: Path, image: str, size: str) -> None:
    before = manifest.read_text()

    result = _run(image, str(manifest), image_size=size)

    assert result.returncode != 0
    assert result.stderr
    assert manifest.read_text() == before


def test_usage_without_arguments() -> None:
    result = _run()
    assert result.returncode == 2
    assert "usage" in result.stderr
