"""The registry page's example, unchanged, with the legacy openai 0.28 client.

openai 0.28 cannot be installed beside openai 3.x, so it runs in its own
virtual environment (made by `make legacy-client`), named by SDXL_LEGACY_PYTHON.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.integration

REGISTRY_EXAMPLE = """
import base64, io, json, sys
import openai
from PIL import Image

openai.api_base = sys.argv[1]
openai.api_key = "random-string"

response = openai.Image.create(
    prompt="Iron man portrait, highly detailed, science fiction landscape, art style by klimt and nixeu and ian sprigger and wlop and krenz cushart",
    n=1,
    size="512x512"
)

image_string = response["data"][0]["b64_json"]

img = Image.open(io.BytesIO(base64.decodebytes(bytes(image_string, "utf-8"))))
print(json.dumps({"version": openai.version.VERSION, "size": img.size, "format": img.format}))
"""

ERRORS = """
import json, sys
import openai
openai.api_base = sys.argv[1]
openai.api_key = "random-string"
out = {}
for name, kwargs in {"n0": {"prompt": "x", "n": 0}, "model": {"prompt": "x", "model": "nope"}}.items():
    try:
        openai.Image.create(**kwargs)
        out[name] = "no error"
    except openai.error.OpenAIError as exc:
        out[name] = [type(exc).__name__, exc.http_status, exc.error.param]
print(json.dumps(out))
"""


EDITS = """
import base64, io, json, sys
import openai
from PIL import Image

openai.api_base = sys.argv[1]
openai.api_key = "random-string"
picture, mask, small_mask = sys.argv[2:5]


def sizes(response):
    return [
        Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size
        for item in response["data"]
    ]


out = {}
edit = openai.Image.create_edit(
    image=open(picture, "rb"), mask=open(mask, "rb"), prompt="a red fox", n=1, size="512x512"
)
out["edit"] = sizes(edit)
out["variation"] = sizes(openai.Image.create_variation(image=open(picture, "rb"), n=2, size="256x256"))
try:
    openai.Image.create_edit(image=open(picture, "rb"), mask=open(small_mask, "rb"), prompt="x")
    out["error"] = "no error"
except openai.error.OpenAIError as exc:
    out["error"] = [type(exc).__name__, exc.http_status, exc.error.param]
print(json.dumps(out))
"""


def legacy_python() -> str:
    python = os.environ.get("SDXL_LEGACY_PYTHON")
    if not python or not Path(python).exists():
        pytest.fail("SDXL_LEGACY_PYTHON is not set: run the tests with `make test`")
    return python


def run_legacy(script: str, service_url: str, *args: str) -> dict:
    completed = subprocess.run(
        [legacy_python(), "-c", script, service_url, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_registry_example_works_unchanged(service_url: str) -> None:
    result = run_legacy(REGISTRY_EXAMPLE, service_url)
    assert result == {"version": "0.28.1", "size": [512, 512], "format": "PNG"}


def test_legacy_client_gets_typed_errors(service_url: str) -> None:
    result = run_legacy(ERRORS, service_url)
    assert result["n0"] == ["InvalidRequestError", 400, "n"]
    assert result["model"] == ["InvalidRequestError", 404, "model"]


def test_legacy_client_edits_and_variations(service_url: str, tmp_path: Path) -> None:
    picture, mask, small_mask = (tmp_path / f"{name}.png" for name in ("picture", "mask", "small"))
    Image.new("RGB", (64, 64), (30, 120, 200)).save(picture)
    transparent_left = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    transparent_left.paste((0, 0, 0, 0), (0, 0, 32, 64))
    transparent_left.save(mask)
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(small_mask)

    result = run_legacy(EDITS, service_url, str(picture), str(mask), str(small_mask))
    assert result["edit"] == [[512, 512]]
    assert result["variation"] == [[256, 256], [256, 256]]
    assert result["error"] == ["InvalidRequestError", 400, "mask"]
