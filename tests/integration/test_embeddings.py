"""Textual-inversion embeddings through the real service: `bentoml serve` with
SDXL_EMBEDDINGS_DIR, files added while it runs (sized for the tiny preset's text encoders,
whose widths GET /v1/models gives), named in a prompt through the openai 3.x client, the
infotext's TI hashes read back from the PNG, and an unusable one refused over raw HTTP."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from safetensors.numpy import save_file

from sdxl_service.api.infotext_reader import parse_infotext
from tests.decoded import decode, pixels
from tests.service_process import RunningService, running_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embeddings")  # empty until the tests add files


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, embeddings_dir: Path
) -> Iterator[RunningService]:
    env = {"SDXL_EMBEDDINGS_DIR": str(embeddings_dir)}
    with running_service(tmp_path_factory.mktemp("service"), env) as running:
        yield running


@pytest.fixture
def http(service: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.api, timeout=120) as client:
        yield client


@pytest.fixture
def client(service: RunningService) -> OpenAI:
    return OpenAI(base_url=service.api, api_key="any", max_retries=0, timeout=120)


def add_embedding(folder: Path, name: str, widths: dict[str, int], vectors: int) -> str:
    """The file's A1111 short hash."""
    rng = np.random.default_rng(len(name))
    tensors = {
        key: rng.standard_normal((vectors, width)).astype(np.float32)
        for key, width in widths.items()
    }
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_a_prompt_naming_an_embedding_renders_with_it_and_says_so(
    client: OpenAI, http: httpx.Client, embeddings_dir: Path
) -> None:
    (card,) = [card for card in http.get("/models").json()["data"] if card.get("preset")]
    widths = card["details"]["embedding_widths"]

    def generate(negative: str) -> str:
        result = client.images.generate(
            prompt="a red fox in the snow",
            size="64x64",
            extra_body={"negative_prompt": negative, "seed": 5, "num_inference_steps": 4},
        )
        b64 = result.data[0].b64_json
        assert b64 is not None
        return b64

    without = generate("(tinyneg:1.2), blurry")  # no such file yet: plain words
    digest = add_embedding(embeddings_dir, "tinyneg", widths, vectors=2)
    cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    assert cards["tinyneg"]["embedding"] == {"name": "tinyneg", "vectors": 2}
    with_it = generate("(tinyneg:1.2), blurry")
    assert np.abs(pixels(with_it) - pixels(without)).max() > 0
    read = parse_infotext(decode(with_it).text["parameters"])
    assert read["Negative prompt"] == "(tinyneg:1.2), blurry"
    assert read["TI hashes"] == f"tinyneg: {digest}"
    assert "TI hashes" not in parse_infotext(decode(without).text["parameters"])


def test_an_sd15_embedding_is_a_400_naming_the_prompt(
    http: httpx.Client, embeddings_dir: Path
) -> None:
    save_file(
        {"emb_params": np.ones((2, 768), np.float32)}, str(embeddings_dir / "sd15.safetensors")
    )
    answer = http.post("/images/generations", json={"prompt": "a portrait, sd15", "size": "64x64"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", "invalid_embedding")
    assert "SD 1.5 embedding" in error["message"]
    cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    assert "SD 1.5 embedding" in cards["sd15"]["warning"]
    # The service stays up.
    ok = http.post("/images/generations", json={"prompt": "a portrait", "size": "64x64"})
    assert ok.status_code == 200
