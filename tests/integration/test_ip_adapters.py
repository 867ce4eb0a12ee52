"""IP-Adapters through the real service: `bentoml serve` with SDXL_IP_ADAPTER_DIR holding tiny
random adapters and image encoders in h94's layout, driven by openai 3.x (`extra_body`) and raw
HTTP."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from tests.decoded import decode
from tests.ip_adapter_files import build_folder
from tests.service_process import RunningService, running_service

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    folder = build_folder(tmp_path_factory.mktemp("ip-adapters"))
    env = {
        "SDXL_IP_ADAPTER_DIR": str(folder),
        "SDXL_CONTROL_CACHE": "2",
        "SDXL_MAX_CONTROLNETS": "2",
    }
    with running_service(tmp_path_factory.mktemp("service"), env) as running:
        yield running


@pytest.fixture
def client(service: RunningService) -> OpenAI:
    return OpenAI(base_url=service.api, api_key="any-string", max_retries=0, timeout=120)


def png(seed: int, width: int = 48, height: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def generate(client: OpenAI, **extra: object) -> list[np.ndarray]:
    result = client.images.generate(
        prompt="a lighthouse", size="64x64", n=2, extra_body={"seed": 3, **extra}
    )
    assert result.data is not None
    return [np.asarray(decode(item.b64_json), dtype=np.int16) for item in result.data]


def test_ip_adapters_in_extra_body_steer_the_image(client: OpenAI, service: RunningService) -> None:
    plain = generate(client)
    one = [{"name": "ip-adapter_sdxl", "images": [data_url(png(1))]}]
    steered = generate(client, ip_adapters=one)
    assert [image.shape for image in steered] == [(64, 64, 3)] * 2
    assert np.abs(steered[0] - plain[0]).mean() > 1.0
    # The same request again: the same pixels, the adapter now loaded.
    assert all(
        np.array_equal(a, b)
        for a, b in zip(generate(client, ip_adapters=one), steered, strict=True)
    )
    # Another picture, the same adapter: another image.
    other = [{"name": "ip-adapter_sdxl", "images": [data_url(png(2))]}]
    assert np.abs(generate(client, ip_adapters=other)[0] - steered[0]).mean() > 1.0
    # Two adapters, a plus one with two pictures, with a LoRA-free request after: unchanged.
    both = [
        {"name": "ip-adapter-plus_sdxl", "images": [data_url(png(3)), data_url(png(4))]},
        {"name": "ip-adapter_sdxl_vit-h", "images": [data_url(png(5))], "scale": 1.2},
    ]
    assert len(generate(client, ip_adapters=both)) == 2
    assert all(np.array_equal(a, b) for a, b in zip(generate(client), plain, strict=True))
    metrics = httpx.get(f"{service.root}/metrics").text
    assert 'sdxl_ip_adapter_loads_total{outcome="ok"} 3.0' in metrics


def test_models_lists_the_adapters(client: OpenAI) -> None:
    cards = {card.id: card for card in client.models.list().data}
    assert cards["ip-adapter_sdxl"].owned_by == "ip_adapter_dir"
    assert "SD 1.5" in str(getattr(cards["ip-adapter_sd15"], "warning", ""))


def test_an_edit_takes_ip_adapters_as_a_form_field(service: RunningService) -> None:
    adapters = [{"name": "ip-adapter_sdxl", "images": [data_url(png(6))], "scale": 0.8}]
    answer = httpx.post(
        f"{service.api}/images/edits",
        data={"prompt": "x", "size": "64x64", "ip_adapters": json.dumps(adapters)},
        files={"image": ("a.png", png(7, 64, 64), "image/png")},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert decode(answer.json()["data"][0]["b64_json"]).size == (64, 64)


@pytest.mark.parametrize(
    ("adapters", "param", "code"),
    [
        ([{"name": "nope", "images": ["eA=="]}], "ip_adapters[0].name", "ip_adapter_not_found"),
        (
            [{"name": "ip-adapter_sd15", "images": ["eA=="]}],
            "ip_adapters[0].name",
            "invalid_ip_adapter",
        ),
        (
            [{"name": "ip-adapter_sdxl", "images": ["eA==", "%"]}],
            "ip_adapters[0].images[0]",
            "invalid_value",
        ),
    ],
)
def test_bad_ip_adapters_are_a_400_naming_them_over_raw_http(
    service: RunningService, adapters: object, param: str, code: str
) -> None:
    body = {"prompt": "x", "size": "64x64", "ip_adapters": adapters}
    answer = httpx.post(f"{service.api}/images/generations", json=body, timeout=60)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert httpx.get(f"{service.root}/readyz").status_code == 200
