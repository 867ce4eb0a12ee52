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


def legacy_python() -> str:
    python = os.environ.get("SDXL_LEGACY_PYTHON")
    if not python or not Path(python).exists():
        pytest.fail("SDXL_LEGACY_PYTHON is not set: run the tests with `make test`")
    return python


def run_legacy(script: str, service_url: str) -> dict:
    completed = subprocess.run(
        [legacy_python(), "-c", script, service_url],
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
