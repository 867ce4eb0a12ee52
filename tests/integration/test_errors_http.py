"""Every bad input gets an OpenAI-shaped error with the right status, and the service stays up."""

from __future__ import annotations

import io
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from tests.polling import metric, wait_until

pytestmark = pytest.mark.integration


def assert_error(
    response: httpx.Response, status: int, param: str | None, code: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "n": "two"}, "n"),
        ({"prompt": "x", "size": "abc"}, "size"),
        ({"prompt": "x", "size": "100x100"}, "size"),
        ({"prompt": "x", "size": "8x8"}, "size"),
        ({"prompt": "x", "size": "4096x4096"}, "size"),
        ({"prompt": "x", "width": 512}, "height"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "response_format": "gif"}, "response_format"),
        ({"prompt": "x", "output_format": "bmp"}, "output_format"),
        ({"prompt": "x", "output_compression": 101, "output_format": "jpeg"}, "output_compression"),
        ({"prompt": "x", "output_compression": 50}, "output_compression"),
        ({"prompt": "x", "quality": "ultra"}, "quality"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "x", "high_noise_frac": 1.5}, "high_noise_frac"),
        ({"prompt": "x", "refiner": "both"}, "refiner"),
        ({"prompt": "x", "scheduler": "magic"}, "scheduler"),
        ({"prompt": "x", "guidance_scale": "loud"}, "guidance_scale"),
        ({"prompt": "x", "background": "transparent"}, "background"),
        ({"prompt": "x", "stream": True, "response_format": "url"}, "response_format"),
    ],
)
def test_bad_values_are_400_naming_the_parameter(
    http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    error = assert_error(http.post("/images/generations", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_missing_prompt(http: httpx.Client) -> None:
    assert_error(
        http.post("/images/generations", json={"n": 1}), 400, "prompt", "missing_required_parameter"
    )


def test_malformed_json(http: httpx.Client) -> None:
    response = http.post(
        "/images/generations", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, None, "invalid_json")


def test_body_that_is_not_an_object(http: httpx.Client) -> None:
    assert_error(http.post("/images/generations", json=["prompt"]), 400, None)


def test_unknown_model_is_404(http: httpx.Client) -> None:
    response = http.post("/images/generations", json={"prompt": "x", "model": "midjourney-7"})
    assert_error(response, 404, "model", "model_not_found")


def test_unknown_path_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/nope"), 404, None)
    assert_error(http.get("/images/generations"), 405, None)
    assert_error(http.get("/images/files/not-a-real-id"), 404, "file_id", "file_not_found")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


PICTURE = ("picture.png", png(Image.new("RGB", (64, 64), (200, 40, 40))), "image/png")
OPAQUE_MASK = ("mask.png", png(Image.new("RGBA", (64, 64), (0, 0, 0, 255))), "image/png")
SMALL_MASK = ("mask.png", png(Image.new("RGBA", (32, 32), (0, 0, 0, 0))), "image/png")


@pytest.mark.parametrize(
    ("path", "files", "fields", "param"),
    [
        ("/images/edits", {}, {"prompt": "x"}, "image"),
        ("/images/edits", {"image": ("a.png", b"GIF89a?", "image/gif")}, {"prompt": "x"}, "image"),
        ("/images/edits", {"image": PICTURE}, {}, "prompt"),
        ("/images/edits", {"image": PICTURE, "mask": SMALL_MASK}, {"prompt": "x"}, "mask"),
        ("/images/edits", {"image": PICTURE, "mask": OPAQUE_MASK}, {"prompt": "x"}, "mask"),
        ("/images/edits", {"image": PICTURE}, {"prompt": "x", "strength": "1.5"}, "strength"),
        ("/images/edits", {"image": PICTURE}, {"prompt": "x", "strength": "0.01"}, "strength"),
        ("/images/edits", {"image": PICTURE}, {"prompt": "x", "n": "11"}, "n"),
        ("/images/edits", {"image": PICTURE}, {"prompt": "x", "size": "8x8"}, "size"),
        ("/images/variations", {"image": PICTURE}, {"size": "64x64"}, "size"),
        ("/images/variations", {"image": ("a.png", png(Image.new("RGB", (64, 32))))}, {}, "image"),
    ],
)
def test_bad_edits_and_variations_are_400_naming_the_parameter(
    http: httpx.Client, path: str, files: dict, fields: dict, param: str
) -> None:
    error = assert_error(http.post(path, files=files, data=fields), 400, param)
    assert error["type"] == "invalid_request_error"


def test_edit_as_json_is_told_to_send_multipart(http: httpx.Client) -> None:
    error = assert_error(http.post("/images/edits", json={"prompt": "x"}), 400, None)
    assert "multipart/form-data" in error["message"]


def test_oversized_upload_is_413(http: httpx.Client) -> None:
    big = ("big.png", b"\x89PNG" + bytes(51 * 1024 * 1024), "image/png")
    assert_error(http.post("/images/edits", files={"image": big}, data={"prompt": "x"}), 413, None)


def test_oversized_body_is_413(http: httpx.Client) -> None:
    response = http.post(
        "/images/generations",
        content=b'{"prompt": "' + b"x" * (51 * 1024 * 1024) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert_error(response, 413, None)


def test_overlong_prompt(http: httpx.Client) -> None:
    assert_error(http.post("/images/generations", json={"prompt": "x" * 4001}), 400, "prompt")


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    body = {"prompt": "x", "size": "64x64", "frobnicate": True, "api_version": "2024"}
    response = http.post("/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1


def test_health_endpoints(service: Any) -> None:
    assert httpx.get(f"{service.root}/v1").json() == {"status": True}
    assert httpx.get(f"{service.root}/v1/").json() == {"status": True}
    assert httpx.get(f"{service.root}/livez").status_code == 200
    assert httpx.get(f"{service.root}/readyz").status_code == 200


def test_service_still_up_after_errors(http: httpx.Client) -> None:
    for body in ({"prompt": "x", "n": 0}, {"prompt": "x", "size": "abc"}, {}):
        assert http.post("/images/generations", json=body).status_code == 400
    response = http.post("/images/generations", json={"prompt": "x", "size": "64x64"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1images/generations",
        "/nothing/here",
        "/v1/images/files/abc%0Adef",
        "/v1/images/files/%0A",
    ],
)
def test_paths_bentoml_would_answer_in_plain_text_get_the_envelope(service: Any, path: str) -> None:
    response = httpx.post(f"{service.root}{path}", json={"prompt": "x"})
    assert response.status_code in (404, 405), response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_bentoml_probes_and_metrics_keep_their_own_answers(service: Any) -> None:
    assert httpx.get(f"{service.root}/livez").status_code == 200
    metrics = httpx.get(f"{service.root}/metrics")
    assert metrics.status_code == 200 and "sdxl_queue_images" in metrics.text


def http_series(service: Any) -> set[str]:
    """The label sets of BentoML's HTTP request metrics on /metrics."""
    text = httpx.get(f"{service.root}/metrics").text
    return {line.split(" ")[0] for line in text.splitlines() if "_request_total{" in line}


def test_distinct_paths_do_not_grow_the_metrics(service: Any) -> None:
    with httpx.Client(base_url=service.root) as client:
        # Every route template once, then a thousand made-up paths and file ids.
        for path in ("/v1/images/files/x", "/v1/nope", "/nope", "/v1/images/files/%0A"):
            client.get(path)
        before = http_series(service)
        for i in range(500):
            client.get(f"/v1/images/files/guess-{i}")
            client.get(f"/made-up/{i}")
        after = http_series(service)
    assert after == before
    assert any('endpoint="/v1/images/files/{file_id}"' in series for series in after)


def requests_answered(service: Any, code: str) -> float:
    return metric(
        service.root,
        "bentoml_service_request_total",
        endpoint="/v1/images/generations",
        http_response_code=code,
    )


def test_a_client_that_hangs_up_mid_body_is_answered_and_leaves_nothing_in_progress(
    service: Any,
) -> None:
    address = urlsplit(service.root)
    before = requests_answered(service, "499")
    for _ in range(5):
        with socket.create_connection((address.hostname, address.port)) as sock:
            sock.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                b'{"prompt":'
            )
    wait_until(
        lambda: requests_answered(service, "499") >= before + 5,
        timeout=60,
        message="the five cut-off requests to be answered 499",
    )
    in_progress = metric(
        service.root,
        "bentoml_service_request_in_progress",
        endpoint="/v1/images/generations",
    )
    assert in_progress == 0
