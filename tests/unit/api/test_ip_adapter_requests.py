"""IP-Adapters through the HTTP process: listed, named by `ip_adapters`, their pictures decoded
once into the render request; every bad entry a 400 naming it. The render worker is a fake
(the HTTP process never imports torch)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdxl_service.api.app import create_app
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.infotext import Provenance, infotext
from sdxl_service.api.serving import ImagesServing
from sdxl_service.choices import RenderKind
from sdxl_service.contract.render_request import GenerationOutcome, IpAdapterWeight, OutcomeStatus
from sdxl_service.settings import Settings
from tests.ip_adapter_files import build_folder
from tests.unit.api.jobs.test_jobs_api import Service
from tests.unit.api.test_serving import SeedPainter


def png(width: int, height: int, colour: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes) -> str:
    return f"data:image/png;base64,{b64(data)}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_folder(tmp_path_factory.mktemp("ip-adapters"))


@pytest.fixture
def painter() -> SeedPainter:
    return SeedPainter()


@pytest.fixture
def client(painter: SeedPainter, folder: Path, tmp_path: Path) -> TestClient:
    settings = Settings(
        files_dir=tmp_path / "files",
        ip_adapter_dir=folder,
        max_pixels=256 * 256,
        control_cache=2,
        max_controlnets=2,
    )
    serving = ImagesServing(settings, painter, LocalFileStore(tmp_path / "files", 60))
    return TestClient(create_app(lambda: serving, settings.max_body_bytes))


def generate(client: TestClient, adapters: Any, **fields: Any) -> Any:
    body = {"prompt": "a cat", "size": "128x128", "ip_adapters": adapters, **fields}
    return client.post("/images/generations", json=body)


def test_models_lists_each_adapter_with_its_problem(client: TestClient) -> None:
    cards = {card["id"]: card for card in client.get("/models").json()["data"]}
    plain = cards["ip-adapter_sdxl"]
    assert plain["owned_by"] == "ip_adapter_dir"
    assert plain["ip_adapter"]["kind"] == "ip-adapter"
    assert plain.get("warning") is None
    assert "SD 1.5" in cards["ip-adapter_sd15"]["warning"]


def test_adapters_and_their_pictures_reach_the_render_request(
    client: TestClient, painter: SeedPainter
) -> None:
    adapters = [
        {"name": "ip-adapter-plus_sdxl", "images": [b64(png(40, 30)), data_url(png(20, 20))]},
        {"name": "ip-adapter_sdxl", "images": [b64(png(8, 8, (1, 2, 3)))], "scale": 1.5},
    ]
    answer = generate(client, adapters, n=2)
    assert answer.status_code == 200, answer.text
    job = painter.jobs[-1]
    assert job.params.ip_adapters == (
        IpAdapterWeight(name="ip-adapter-plus_sdxl", scale=0.6, images=2),
        IpAdapterWeight(name="ip-adapter_sdxl", scale=1.5, images=1),
    )
    first, second = job.ip_adapter_images
    assert [(p.width, p.height) for p in first] == [(40, 30), (20, 20)]
    assert second[0].rgb == bytes([1, 2, 3]) * 64
    assert len(job.seeds) == 2  # the n images share the pictures: sent once


def test_requests_without_adapters_are_unchanged(client: TestClient, painter: SeedPainter) -> None:
    assert (
        client.post("/images/generations", json={"prompt": "a", "size": "128x128"}).status_code
        == 200
    )
    job = painter.jobs[-1]
    assert job.params.ip_adapters == () and job.ip_adapter_images == ()


@pytest.mark.parametrize(
    ("adapters", "param", "code"),
    [
        ([{"name": "absent", "images": ["x"]}], "ip_adapters[0].name", "ip_adapter_not_found"),
        (
            [{"name": "../sdxl_models/x", "images": ["x"]}],
            "ip_adapters[0].name",
            "ip_adapter_not_found",
        ),
        (
            [{"name": "ip-adapter_sd15", "images": ["x"]}],
            "ip_adapters[0].name",
            "invalid_ip_adapter",
        ),
        ([{"name": "ip-adapter_sdxl", "images": []}], "ip_adapters[0].images", "invalid_value"),
        (
            [{"name": "ip-adapter_sdxl", "images": [b64(png(8, 8))] * 5}],
            "ip_adapters[0].images",
            "invalid_value",
        ),
        (
            [{"name": "ip-adapter_sdxl", "images": [b64(png(8, 8))], "scale": 2.5}],
            "ip_adapters[0].scale",
            "invalid_value",
        ),
        (
            [{"name": "ip-adapter_sdxl", "images": [b64(png(8, 8))], "scale": -0.1}],
            "ip_adapters[0].scale",
            "invalid_value",
        ),
        (
            [{"name": "ip-adapter_sdxl", "images": [b64(png(8, 8))], "scale": "lots"}],
            "ip_adapters[0].scale",
            "invalid_value",
        ),
        (
            [{"name": "ip-adapter_sdxl", "images": [b64(png(8, 8))], "weight": 1}],
            "ip_adapters[0].weight",
            "invalid_value",
        ),
        (
            [
                {"name": "ip-adapter_sdxl", "images": [b64(png(8, 8))]},
                {"name": "ip-adapter_sdxl", "images": [b64(png(8, 8)), b64(png(8, 8)), "%%%"]},
            ],
            "ip_adapters[1].images[2]",
            "invalid_value",
        ),
        (
            [{"name": "ip-adapter_sdxl", "images": ["https://example.com/a.png"]}],
            "ip_adapters[0].images[0]",
            "invalid_value",
        ),
        (
            [{"name": "ip-adapter_sdxl", "images": [b64(b"not a picture at all")]}],
            "ip_adapters[0].images[0]",
            "invalid_value",
        ),
        (
            [{"name": "ip-adapter_sdxl", "images": [b64(png(300, 300))]}],
            "ip_adapters[0].images[0]",
            "image_too_large",
        ),
        ([{"name": "ip-adapter_sdxl", "images": ["x"]}] * 3, "ip_adapters", "invalid_value"),
        ("not a list", "ip_adapters", "invalid_value"),
    ],
)
def test_every_bad_entry_is_a_400_naming_it(
    client: TestClient, painter: SeedPainter, adapters: Any, param: str, code: str
) -> None:
    answer = generate(client, adapters)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert painter.jobs == []


def test_a_failed_load_in_the_worker_is_a_400_naming_ip_adapters(
    client: TestClient, painter: SeedPainter
) -> None:
    painter.outcome = GenerationOutcome(
        status=OutcomeStatus.INVALID_IP_ADAPTER,
        message="IP-Adapter 'ip-adapter_sdxl' cannot be used: its weights do not fit",
    )
    answer = generate(client, [{"name": "ip-adapter_sdxl", "images": [b64(png(8, 8))]}])
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == ("ip_adapters", "invalid_ip_adapter")


def test_edits_take_ip_adapters_as_a_json_form_field(
    client: TestClient, painter: SeedPainter
) -> None:
    adapters = [{"name": "ip-adapter_sdxl_vit-h", "images": [b64(png(16, 16))], "scale": 0.3}]
    answer = client.post(
        "/images/edits",
        files={"image": ("a.png", png(64, 64))},
        data={"prompt": "x", "ip_adapters": json.dumps(adapters)},
    )
    assert answer.status_code == 200, answer.text
    job = painter.jobs[-1]
    assert job.params.kind is RenderKind.IMAGE_TO_IMAGE
    assert job.params.ip_adapters == (IpAdapterWeight(name="ip-adapter_sdxl_vit-h", scale=0.3),)
    bad = client.post(
        "/images/variations",
        files={"image": ("a.png", png(64, 64))},
        data={"ip_adapters": "[{"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "ip_adapters"


def test_image_jobs_take_ip_adapters(folder: Path, tmp_path: Path) -> None:
    service = Service(tmp_path, ip_adapter_dir=folder)
    adapters = [{"name": "ip-adapter_sdxl", "images": [b64(png(8, 8, (4, 5, 6)))], "scale": 0.9}]
    with service.client:
        body = {"kind": "generation", "prompt": "x", "size": "64x64", "ip_adapters": adapters}
        submitted = service.client.post("/images/jobs", json=body)
        assert submitted.status_code == 202, submitted.text
        assert service.ended(submitted.json()["id"])["status"] == "succeeded"
        job = service.painter.jobs[-1]
        assert job.params.ip_adapters == (IpAdapterWeight(name="ip-adapter_sdxl", scale=0.9),)
        assert job.ip_adapter_images[0][0].rgb == bytes([4, 5, 6]) * 64
        edit = service.client.post(
            "/images/jobs",
            files={"image": ("a.png", png(64, 64))},
            data={"kind": "edit", "prompt": "x", "ip_adapters": json.dumps(adapters)},
        )
        assert edit.status_code == 202, edit.text
        assert service.ended(edit.json()["id"])["status"] == "succeeded"
        assert service.painter.jobs[-1].params.kind is RenderKind.IMAGE_TO_IMAGE
        body["ip_adapters"] = [{"name": "absent", "images": [b64(png(8, 8))]}]
        refused = service.client.post("/images/jobs", json=body)
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "ip_adapters[0].name"
        assert "ip_adapters" in json.dumps(service.client.get("/openapi.json").json())


def test_infotext_writes_each_adapter_as_a_controlnet_unit(
    client: TestClient, painter: SeedPainter
) -> None:
    adapters = [
        {"name": "ip-adapter_sdxl", "images": [b64(png(8, 8))]},
        {"name": "ip-adapter-plus_sdxl_vit-h", "images": [b64(png(8, 8))], "scale": 1},
    ]
    assert generate(client, adapters).status_code == 200
    job = painter.jobs[-1]
    provenance = Provenance(
        base_model="base",
        refiner_model="refiner",
        ip_adapter_modules={"ip-adapter-plus_sdxl_vit-h": "ip-adapter_clip_h"},
    )
    text = infotext(job, provenance, seed=1, width=128, height=128)
    assert (
        'ControlNet 0: "Module: ip-adapter_clip_g, Model: ip-adapter_sdxl, Weight: 0.6, '
        "Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, "
        'Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"'
    ) in text
    assert (
        'ControlNet 1: "Module: ip-adapter_clip_h, Model: ip-adapter-plus_sdxl_vit-h, Weight: 1.0,'
        in text
    )
