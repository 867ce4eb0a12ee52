"""Embeddings through the HTTP process: listed, checked where a prompt names one, written into
the infotext as A1111's `TI hashes`. The render worker is a fake that describes its text
encoders' widths as the engine does (the HTTP process never imports torch)."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.numpy import save_file

from sdxl_service.api.app import create_app
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.infotext import Provenance, infotext
from sdxl_service.api.infotext_reader import parse_infotext
from sdxl_service.api.serving import ImagesServing
from sdxl_service.contract.render_request import GenerationOutcome, OutcomeStatus
from sdxl_service.settings import Settings
from tests.unit.api.test_infotext import job
from tests.unit.api.test_serving import SeedPainter

WIDTHS = {"clip_l": 32, "clip_g": 64}


class WidthsPainter(SeedPainter):
    async def describe(self) -> dict[str, Any]:
        return {**await super().describe(), "embedding_widths": WIDTHS}


def embedding(path: Path, vectors: int, widths: dict[str, int] = WIDTHS) -> bytes:
    tensors = {key: np.full((vectors, width), 0.5, np.float32) for key, width in widths.items()}
    save_file(tensors, str(path))
    return path.read_bytes()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    embedding(folder / "tinyneg.safetensors", 2)
    embedding(folder / "tinystyle.safetensors", 1)
    embedding(folder / "fullsize.safetensors", 1, {"clip_l": 768, "clip_g": 1280})
    save_file({"emb_params": np.ones((2, 32), np.float32)}, str(folder / "sd15.safetensors"))
    return folder


@pytest.fixture
def painter() -> WidthsPainter:
    return WidthsPainter()


@pytest.fixture
def client(painter: WidthsPainter, folder: Path, tmp_path: Path) -> TestClient:
    settings = Settings(files_dir=tmp_path / "files", embeddings_dir=folder)
    serving = ImagesServing(settings, painter, LocalFileStore(tmp_path / "files", 60))
    return TestClient(create_app(lambda: serving, settings.max_body_bytes))


def generate(client: TestClient, prompt: str, negative: str = "") -> Any:
    body = {"prompt": prompt, "negative_prompt": negative, "size": "64x64", "seed": 3}
    return client.post("/images/generations", json=body)


def parameters(answer: Any) -> dict[str, str]:
    b64 = answer.json()["data"][0]["b64_json"]
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return parse_infotext(image.text["parameters"])


def short_hash(folder: Path, name: str) -> str:
    return hashlib.sha256((folder / f"{name}.safetensors").read_bytes()).hexdigest()[:12]


def test_models_lists_each_embedding_with_its_vectors_or_its_problem(client: TestClient) -> None:
    cards = {card["id"]: card for card in client.get("/models").json()["data"]}
    assert cards["tinyneg"]["owned_by"] == "embeddings_dir"
    assert cards["tinyneg"]["embedding"] == {"name": "tinyneg", "vectors": 2}
    assert cards["tinyneg"].get("warning") is None
    assert "SD 1.5 embedding" in cards["sd15"]["warning"]
    assert "768 and 1280 wide" in cards["fullsize"]["warning"]


def test_the_infotext_has_the_ti_hashes_of_the_embeddings_named(
    client: TestClient, folder: Path, painter: WidthsPainter
) -> None:
    answer = generate(client, "a (tinystyle:1.2) fox, tinystyle", "tinyneg, blurry")
    assert answer.status_code == 200, answer.text
    expected = (
        f"tinystyle: {short_hash(folder, 'tinystyle')}, tinyneg: {short_hash(folder, 'tinyneg')}"
    )
    assert parameters(answer)["TI hashes"] == expected
    # The prompt travels to the render worker as written: it finds the names itself.
    assert painter.jobs[-1].prompt == "a (tinystyle:1.2) fox, tinystyle"


def test_words_that_merely_contain_a_name_are_no_embedding(client: TestClient) -> None:
    answer = generate(client, "tinystyles, asd15, a fullsizeish fox")
    assert answer.status_code == 200, answer.text
    assert "TI hashes" not in parameters(answer)


@pytest.mark.parametrize(
    ("prompt", "negative", "param", "problem"),
    [
        ("a sd15 fox", "", "prompt", "SD 1.5 embedding"),
        ("a fox", "FULLSIZE", "negative_prompt", "768 and 1280 wide"),
    ],
)
def test_an_unusable_embedding_is_a_400_naming_the_field(
    client: TestClient, painter: WidthsPainter, prompt: str, negative: str, param: str, problem: str
) -> None:
    answer = generate(client, prompt, negative)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (
        param,
        "invalid_embedding",
        "invalid_request_error",
    )
    assert problem in error["message"] and f"named in {param}" in error["message"]
    assert painter.jobs == []  # refused before it was queued


def test_a_worker_that_cannot_use_an_embedding_answers_400(
    client: TestClient, painter: WidthsPainter
) -> None:
    """The file changed after this process checked it: the render worker says so."""
    message = "The embedding 'tinyneg' named in prompt cannot be used: the file changed."
    painter.outcome = GenerationOutcome(status=OutcomeStatus.INVALID_EMBEDDING, message=message)
    answer = generate(client, "a tinyneg fox")
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["message"]) == ("invalid_embedding", message)


def test_a_new_file_needs_no_restart(client: TestClient, folder: Path) -> None:
    assert "TI hashes" not in parameters(generate(client, "a latestyle fox"))
    embedding(folder / "latestyle.safetensors", 3)
    assert parameters(generate(client, "a latestyle fox"))["TI hashes"] == (
        f"latestyle: {short_hash(folder, 'latestyle')}"
    )


def test_infotext_writes_ti_hashes_after_lora_hashes_quoted() -> None:
    provenance = Provenance(
        base_model="base",
        refiner_model="refiner",
        lora_hashes={"style": "0123456789ab"},
        ti_hashes={"negativeXL": "1a2b3c4d5e6f", "bad-hands-5": "abcdefabcdef"},
        version="v",
    )
    last = infotext(job(), provenance, seed=7, width=1024, height=1024).splitlines()[-1]
    assert last.endswith(
        'Lora hashes: "style: 0123456789ab", '
        'TI hashes: "negativeXL: 1a2b3c4d5e6f, bad-hands-5: abcdefabcdef", Version: v'
    )
