"""The HTTP app and ImagesServing in-process, with a pipeline that paints seeds."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdxl_service.api.app import create_app
from sdxl_service.api.encoding import resize_to
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.request_rules import (
    EDIT_STRENGTH,
    INPAINT_STRENGTH,
    QUALITY_STEPS,
    VARIATION_STRENGTH,
)
from sdxl_service.api.serving import ImagesServing
from sdxl_service.choices import RefinerMode, RenderKind
from sdxl_service.contract.render_request import (
    GenerationOutcome,
    OutcomeStatus,
    RenderedImage,
    RenderEvent,
    RenderEventType,
    RenderRequest,
)
from sdxl_service.settings import Settings
from tests.decoded import decode, server_timing


class SeedPainter:
    """Stands in for the pipeline process: one flat colour per seed."""

    def __init__(self, native: int = 128) -> None:
        self.native = native
        self.jobs: list[RenderRequest] = []
        self.outcome: GenerationOutcome | None = None
        self.loaded = True
        # Previews sent before `outcome` (when set) even if it is a failure.
        self.previews_before_outcome = True

    async def generate(self, job: RenderRequest, on_partial: Any = None) -> GenerationOutcome:
        self.jobs.append(job)
        width, height = job.params.width, job.params.height
        if on_partial is not None and (self.outcome is None or self.previews_before_outcome):
            # Previews a shade of grey per preview, image by image within a step.
            for partial_index in range(job.partial_images):
                for index, seed in enumerate(job.seeds):
                    shade = bytes([10 * (partial_index + 1)] * 3)
                    preview = RenderedImage(
                        seed=seed, width=width, height=height, rgb=shade * (width * height)
                    )
                    await on_partial(
                        RenderEvent(
                            type=RenderEventType.PARTIAL,
                            index=index,
                            partial_index=partial_index,
                            image=preview,
                        )
                    )
        if self.outcome is not None:
            return self.outcome
        images = [
            RenderedImage(
                seed=seed,
                width=width,
                height=height,
                rgb=bytes([seed % 256, 0, 0]) * (width * height),
            )
            for seed in job.seeds
        ]
        # As a render worker reports them: seconds rendering, and the rest.
        return GenerationOutcome(
            status=OutcomeStatus.OK, images=images, render_s=0.1234, waited_s=0.002
        )

    async def describe(self) -> dict[str, Any]:
        if not self.loaded:
            return {"loaded": False}
        return {"loaded": True, "preset": "tiny", "native_resolution": self.native}


@pytest.fixture
def painter() -> SeedPainter:
    return SeedPainter()


@pytest.fixture
def client(painter: SeedPainter, tmp_path) -> TestClient:
    settings = Settings(files_dir=tmp_path, max_body_bytes=10_000)
    serving = ImagesServing(settings, painter, LocalFileStore(tmp_path, 60))
    return TestClient(create_app(lambda: serving, settings.max_body_bytes))


def test_small_request_renders_native_and_answers_requested_size(client, painter) -> None:
    response = client.post("/images/generations", json={"prompt": "x", "size": "128x64", "seed": 9})
    assert response.status_code == 200
    job = painter.jobs[-1]
    assert job.params.width * job.params.height >= 128 * 128 * 0.95
    image = decode(response.json()["data"][0]["b64_json"])
    assert image.size == (128, 64)
    assert np.asarray(image)[0, 0, 0] == 9


def test_the_answer_says_where_its_time_went_in_server_timing(client) -> None:
    response = client.post("/images/generations", json={"prompt": "x", "size": "64x64"})
    assert response.status_code == 200
    timing = server_timing(response.headers["server-timing"])
    assert list(timing) == ["queue", "render", "encode", "total"]
    assert (timing["queue"], timing["render"]) == (2.0, 123.4)
    assert 0 < timing["encode"] <= timing["total"]
    assert set(response.json()) == {
        "created",
        "data",
        "size",
        "output_format",
        "quality",
        "background",
    }


def test_seeds_are_consecutive_and_returned(client, painter) -> None:
    data = client.post(
        "/images/generations", json={"prompt": "x", "n": 3, "seed": 0, "size": "64x64"}
    ).json()
    assert [d["seed"] for d in data["data"]] == [0, 1, 2]
    assert painter.jobs[-1].seeds == [0, 1, 2]


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_images_encoded_in_threads_keep_their_order(client, response_format) -> None:
    # 4 x 512x512 is past the inline limit: one thread per image.
    body = {"prompt": "x", "n": 4, "seed": 40, "size": "512x512"}
    data = client.post(
        "/images/generations", json={**body, "response_format": response_format}
    ).json()["data"]
    assert [d["seed"] for d in data] == [40, 41, 42, 43]
    for item in data:
        if response_format == "url":
            served = client.get(item["url"].removeprefix("http://testserver"))
            image = Image.open(io.BytesIO(served.content))
        else:
            image = decode(item["b64_json"])
        # SeedPainter paints each image's red channel with its seed.
        assert image.size == (512, 512)
        assert np.asarray(image)[0, 0, 0] == item["seed"]


def test_random_seed_when_none_given(client, painter) -> None:
    client.post("/images/generations", json={"prompt": "x", "size": "64x64"})
    client.post("/images/generations", json={"prompt": "x", "size": "64x64"})
    assert painter.jobs[0].seeds != painter.jobs[1].seeds


def test_quality_maps_to_steps_and_steps_override(client, painter) -> None:
    client.post("/images/generations", json={"prompt": "x", "quality": "hd", "size": "64x64"})
    assert painter.jobs[-1].params.num_inference_steps == QUALITY_STEPS["hd"]
    client.post(
        "/images/generations",
        json={"prompt": "x", "quality": "hd", "size": "64x64", "num_inference_steps": 7},
    )
    assert painter.jobs[-1].params.num_inference_steps == 7


def test_auto_size_is_1024(client, painter) -> None:
    data = client.post("/images/generations", json={"prompt": "x", "size": "auto"}).json()
    assert data["size"] == "1024x1024"


def test_url_response_is_stored_and_served(client) -> None:
    data = client.post(
        "/images/generations",
        json={"prompt": "x", "size": "64x64", "response_format": "url", "output_format": "webp"},
    ).json()
    url = data["data"][0]["url"]
    assert url.startswith("http://testserver/images/files/")
    served = client.get(url.removeprefix("http://testserver"))
    assert served.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(served.content)).format == "WEBP"


@pytest.mark.parametrize(
    ("status", "http_status", "code", "should_retry"),
    [
        (OutcomeStatus.QUEUE_FULL, 429, "queue_full", "true"),
        (OutcomeStatus.LOADING, 503, "loading", "true"),
        (OutcomeStatus.TIMEOUT, 504, "timeout", "false"),
        (OutcomeStatus.OUT_OF_MEMORY, 503, "out_of_memory", "false"),
        (OutcomeStatus.WORKER_RESTARTED, 503, "worker_restarted", "true"),
        (OutcomeStatus.ERROR, 500, "generation_failed", "false"),
    ],
)
def test_outcomes_become_openai_errors(
    client, painter, status, http_status, code, should_retry
) -> None:
    painter.outcome = GenerationOutcome(status=status, message="explained", retry_after=7)
    response = client.post("/images/generations", json={"prompt": "x", "size": "64x64"})
    assert response.status_code == http_status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"] == "explained"
    assert response.headers["x-should-retry"] == should_retry
    if should_retry == "true":
        assert response.headers["retry-after"] == "7"


def test_loading_pipeline_is_503_with_retry_after(client, painter) -> None:
    painter.loaded = False
    response = client.post("/images/generations", json={"prompt": "x"})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "loading"


def test_model_names(client) -> None:
    for model in ("stable-diffusion-xl-with-refiner", "dall-e-3", "gpt-image-1", None):
        body = {"prompt": "x", "size": "64x64", "model": model}
        assert client.post("/images/generations", json=body).status_code == 200
    response = client.post("/images/generations", json={"prompt": "x", "model": "sd-1.5"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_validation_never_leaks_fastapi_shape(client) -> None:
    response = client.post("/images/generations", json={"prompt": "x", "n": "many"})
    assert response.status_code == 400
    assert "detail" not in response.json()
    assert response.json()["error"]["param"] == "n"


def test_body_limit_without_content_length(client) -> None:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 1000
        yield b'"}'

    response = client.post(
        "/images/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


def test_models_list_warns_for_tiny(client) -> None:
    card = client.get("/models").json()["data"][0]
    assert card["id"] == "stable-diffusion-xl-with-refiner"
    assert card["preset"] == "tiny" and "noise" in card["warning"]


def test_unknown_paths_and_methods_are_openai_errors(client) -> None:
    response = client.get("/no/such/path")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    response = client.delete("/images/generations")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_stream_sends_one_completed_event_per_image(client) -> None:
    body = {"prompt": "x", "size": "64x64", "n": 2, "seed": 4, "stream": True}
    response = client.post("/images/generations", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block]
    assert len(events) == 2
    for event, seed in zip(events, (4, 5), strict=True):
        name, data = event.split("\n")
        assert name == "event: image_generation.completed"
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == "image_generation.completed"
        assert payload["seed"] == seed
        assert decode(payload["b64_json"]).size == (64, 64)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.split("\n\n"):
        if block:
            name, data = block.split("\n")
            events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def test_stream_with_partial_images_sends_each_images_previews_before_it(client, painter) -> None:
    body = {
        "prompt": "x",
        "size": "96x64",
        "n": 2,
        "seed": 4,
        "stream": True,
        "partial_images": 2,
        "output_format": "jpeg",
    }
    response = client.post("/images/generations", json=body)
    assert response.status_code == 200
    assert painter.jobs[-1].partial_images == 2
    events = sse_events(response.text)
    assert len(events) == 2 * 2 + 2
    for seed in (4, 5):
        mine = [(name, data) for name, data in events if data["seed"] == seed]
        names = [name for name, _ in mine]
        assert names == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
        assert [data.get("partial_image_index") for _, data in mine] == [0, 1, None]
        for name, data in mine:
            assert data["type"] == name
            assert (data["size"], data["output_format"]) == ("96x64", "jpeg")
            assert {"created_at", "quality", "background"} <= data.keys()
            picture = decode(data["b64_json"])
            assert (picture.size, picture.format) == ((96, 64), "JPEG")
    # Each preview is the picture of its step (shade 10, then 20), resized.
    first = decode(events[0][1]["b64_json"]).convert("L")
    assert abs(np.asarray(first).mean() - 10) < 3


def test_partial_images_without_stream_is_ignored(client, painter) -> None:
    body = {"prompt": "x", "size": "64x64", "partial_images": 3}
    response = client.post("/images/generations", json=body)
    assert response.status_code == 200
    assert painter.jobs[-1].partial_images == 0


@pytest.mark.parametrize("value", [-1, 4, "many"])
def test_partial_images_out_of_range_is_a_400_naming_it(client, value) -> None:
    body = {"prompt": "x", "stream": True, "partial_images": value}
    response = client.post("/images/generations", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "partial_images"


def test_a_stream_refused_before_any_preview_gets_its_http_status(client, painter) -> None:
    painter.previews_before_outcome = False
    painter.outcome = GenerationOutcome(
        status=OutcomeStatus.QUEUE_FULL, message="busy", retry_after=3.0
    )
    body = {"prompt": "x", "size": "64x64", "stream": True, "partial_images": 2}
    response = client.post("/images/generations", json=body)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"


def test_a_failure_after_previews_is_an_error_event(client, painter) -> None:
    painter.outcome = GenerationOutcome(status=OutcomeStatus.ERROR, message="CUDA went away")
    body = {"prompt": "x", "size": "64x64", "stream": True, "partial_images": 1}
    response = client.post("/images/generations", json=body)
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [name for name, _ in events] == ["image_generation.partial_image", "error"]
    error = events[-1][1]["error"]
    assert "CUDA went away" in error["message"] and error["type"]


def test_edit_stream_sends_image_edit_partial_images(edits_client) -> None:
    response = edits_client.post(
        "/images/edits",
        files={"image": part(noise(64, 64))},
        data={"prompt": "x", "seed": "4", "stream": "true", "partial_images": "1"},
    )
    names = [name for name, _ in sse_events(response.text)]
    assert names == ["image_edit.partial_image", "image_edit.completed"]


# --- edits and variations (multipart) -----------------------------------------


@pytest.fixture
def edits_client(painter: SeedPainter, tmp_path) -> TestClient:
    settings = Settings(files_dir=tmp_path, max_body_bytes=1_000_000)
    serving = ImagesServing(settings, painter, LocalFileStore(tmp_path, 60))
    return TestClient(create_app(lambda: serving, settings.max_body_bytes))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))


def left_half_transparent(width: int, height: int) -> Image.Image:
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return mask


def part(image: Image.Image, name: str = "picture.png") -> tuple[str, bytes, str]:
    return (name, png(image), "image/png")


def test_edit_is_img2img_of_the_picture_at_its_own_size(edits_client, painter) -> None:
    picture = noise(96, 64)
    response = edits_client.post(
        "/images/edits", files={"image": part(picture)}, data={"prompt": "a fox", "seed": "3"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "96x64"
    assert decode(response.json()["data"][0]["b64_json"]).size == (96, 64)
    job = painter.jobs[-1]
    assert (job.params.kind, job.params.strength, job.prompt, job.mask) == (
        RenderKind.IMAGE_TO_IMAGE,
        EDIT_STRENGTH,
        "a fox",
        None,
    )
    # Rendered at native scale, as generations are; the picture resized to match.
    assert job.params.width * job.params.height >= 128 * 128 * 0.95
    sent = Image.frombytes("RGB", (job.params.width, job.params.height), job.init_image)
    assert np.array_equal(
        np.asarray(sent), np.asarray(resize_to(picture, job.params.width, job.params.height))
    )


def test_edit_with_mask_repaints_only_the_transparent_region(edits_client, painter) -> None:
    picture = noise(64, 64)
    response = edits_client.post(
        "/images/edits",
        files={"image": part(picture), "mask": part(left_half_transparent(64, 64))},
        data={"prompt": "a fox", "seed": "3"},
    )
    assert response.status_code == 200, response.text
    job = painter.jobs[-1]
    assert (job.params.kind, job.params.strength) == (RenderKind.INPAINT, INPAINT_STRENGTH)
    mask = np.asarray(Image.frombytes("L", (job.params.width, job.params.height), job.mask))
    assert (mask[:, : job.params.width // 2] == 255).all() and (
        mask[:, job.params.width // 2 :] == 0
    ).all()
    answer = np.asarray(decode(response.json()["data"][0]["b64_json"]))
    # The painter paints (seed, 0, 0); outside the mask the picture comes back exactly.
    assert np.array_equal(answer[:, 32:], np.asarray(picture)[:, 32:])
    assert (answer[:, :32] == (3, 0, 0)).all()


def test_edit_takes_image_brackets_and_every_option_as_form_fields(edits_client, painter) -> None:
    fields = {
        "prompt": "x",
        "n": "2",
        "seed": "7",
        "size": "128x128",
        "strength": "0.3",
        "refiner": "none",
        "num_inference_steps": "12",
        "guidance_scale": "7.5",
        "high_noise_frac": "0.7",
        "scheduler": "euler_a",
        "negative_prompt": "blurry",
        "output_format": "webp",
        "output_compression": "80",
        "input_fidelity": "high",
        "unknown_field": "ignored",
    }
    response = edits_client.post(
        "/images/edits", files=[("image[]", part(noise(96, 64)))], data=fields
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["seed"] for item in body["data"]] == [7, 8]
    assert body["size"] == "128x128" and body["output_format"] == "webp"
    assert decode(body["data"][0]["b64_json"]).size == (128, 128)
    job = painter.jobs[-1]
    assert (
        job.seeds == [7, 8]
        and job.params.strength == 0.3
        and job.params.refiner is RefinerMode.NONE
    )
    assert (
        job.params.num_inference_steps,
        job.params.guidance_scale,
        job.params.high_noise_frac,
    ) == (
        12,
        7.5,
        0.7,
    )
    assert (job.params.scheduler, job.negative_prompt) == ("euler_a", "blurry")


def test_edit_stream_sends_image_edit_completed_events(edits_client) -> None:
    response = edits_client.post(
        "/images/edits",
        files={"image": part(noise(64, 64))},
        data={"prompt": "x", "n": "2", "seed": "4", "stream": "true"},
    )
    events = [block for block in response.text.split("\n\n") if block]
    assert [event.split("\n")[0] for event in events] == ["event: image_edit.completed"] * 2
    payload = json.loads(events[1].split("\n")[1].removeprefix("data: "))
    assert payload["type"] == "image_edit.completed" and payload["seed"] == 5


def test_variation_is_an_edit_of_the_picture_with_no_prompt(edits_client, painter) -> None:
    response = edits_client.post(
        "/images/variations",
        files={"image": part(noise(64, 64))},
        data={"n": "2", "size": "256x256"},
    )
    assert response.status_code == 200, response.text
    assert [decode(item["b64_json"]).size for item in response.json()["data"]] == [(256, 256)] * 2
    job = painter.jobs[-1]
    assert (job.params.kind, job.prompt, job.params.strength) == (
        RenderKind.IMAGE_TO_IMAGE,
        "",
        VARIATION_STRENGTH,
    )
    assert len(job.seeds) == 2


def test_variation_size_defaults_to_1024(edits_client) -> None:
    response = edits_client.post("/images/variations", files={"image": part(noise(64, 64))})
    assert response.json()["size"] == "1024x1024"


def error_of(response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    assert "detail" not in response.json()
    return response.json()["error"]


PICTURE = part(noise(64, 64))


@pytest.mark.parametrize(
    ("files", "fields", "param"),
    [
        ({}, {"prompt": "x"}, "image"),
        ({"image": PICTURE}, {}, "prompt"),
        ({"image": ("a.png", b"not a picture", "image/png")}, {"prompt": "x"}, "image"),
        ({"image": ("a.png", b"", "image/png")}, {"prompt": "x"}, "image"),
        ([("image", PICTURE), ("image[]", PICTURE)], {"prompt": "x"}, "image"),
        ({}, {"prompt": "x", "image": "picture.png"}, "image"),
        (
            {"image": PICTURE, "mask": part(left_half_transparent(32, 64))},
            {"prompt": "x"},
            "mask",
        ),
        ({"image": PICTURE, "mask": part(noise(64, 64))}, {"prompt": "x"}, "mask"),
        ({"image": PICTURE}, {"prompt": "x", "strength": "0"}, "strength"),
        ({"image": PICTURE}, {"prompt": "x", "strength": "1.5"}, "strength"),
        ({"image": PICTURE}, {"prompt": "x", "strength": "much"}, "strength"),
        ({"image": PICTURE}, {"prompt": "x", "strength": "0.01"}, "strength"),  # 0 of 30 steps
        ({"image": PICTURE}, {"prompt": "x", "n": "11"}, "n"),
        ({"image": PICTURE}, {"prompt": "x", "size": "100x100"}, "size"),
        ({"image": PICTURE}, {"prompt": "x", "response_format": "gif"}, "response_format"),
        ({"image": PICTURE}, {"prompt": "x", "background": "transparent"}, "background"),
        ({"image": PICTURE}, {"prompt": "x", "output_compression": "50"}, "output_compression"),
    ],
)
def test_bad_edits_are_400_naming_the_parameter(edits_client, files, fields, param) -> None:
    error = error_of(edits_client.post("/images/edits", files=files, data=fields))
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("files", "fields", "param"),
    [
        ({}, {}, "image"),
        ({"image": part(noise(64, 32))}, {}, "image"),  # not square
        ({"image": PICTURE}, {"size": "640x640"}, "size"),
        ({"image": PICTURE}, {"stream": "true"}, "stream"),
        ({"image": PICTURE}, {"strength": "2"}, "strength"),
        ({"image": PICTURE}, {"n": "0"}, "n"),
    ],
)
def test_bad_variations_are_400_naming_the_parameter(edits_client, files, fields, param) -> None:
    error = error_of(edits_client.post("/images/variations", files=files, data=fields))
    assert error["param"] == param


def test_edit_sent_as_json_is_told_to_use_multipart(edits_client) -> None:
    error = error_of(edits_client.post("/images/edits", json={"prompt": "x", "image": "..."}))
    assert error["code"] == "invalid_content_type" and "multipart/form-data" in error["message"]


def test_edit_with_an_unknown_model_is_404(edits_client) -> None:
    response = edits_client.post(
        "/images/edits", files={"image": PICTURE}, data={"prompt": "x", "model": "sd-1.5"}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


def test_edit_upload_over_the_body_limit_is_413(client) -> None:
    response = client.post(
        "/images/edits", files={"image": part(noise(128, 128))}, data={"prompt": "x"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


# --- what real clients and hostile input found ---------------------------------


@pytest.mark.parametrize(
    ("model", "answer"),
    [("dall-e-2", "url"), ("dall-e-3", "url"), ("gpt-image-1", "b64_json"), (None, "b64_json")],
)
def test_dall_e_requests_default_to_url_as_openai_answers_them(client, model, answer) -> None:
    body = {"prompt": "x", "size": "64x64", "model": model}
    item = client.post("/images/generations", json=body).json()["data"][0]
    assert item.get(answer) and not item.get({"url": "b64_json", "b64_json": "url"}[answer])


def test_a_dall_e_stream_still_carries_its_images_inline(client) -> None:
    body = {"prompt": "x", "size": "64x64", "model": "dall-e-3", "stream": True}
    response = client.post("/images/generations", json=body)
    payload = json.loads(response.text.split("\n")[1].removeprefix("data: "))
    assert decode(payload["b64_json"]).size == (64, 64)


@pytest.mark.parametrize("headers", [{}, {"content-type": "application/json"}])
def test_an_empty_body_names_the_missing_prompt(client, headers) -> None:
    response = client.post("/images/generations", content=b"", headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
    assert response.json()["error"]["message"] == "Missing required parameter: 'prompt'."


def test_a_negative_prompt_is_bounded_like_the_prompt(client, painter) -> None:
    body = {"prompt": "x", "size": "64x64", "negative_prompt": "n" * 4001}
    response = client.post("/images/generations", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "negative_prompt"
    assert painter.jobs == []


@pytest.mark.parametrize(
    ("field", "value", "status"), [("model", "m" * 200, 404), ("size", "9" * 100 + "x", 400)]
)
def test_errors_quote_only_the_start_of_a_bad_value(client, field, value, status) -> None:
    response = client.post("/images/generations", json={"prompt": "x", field: value})
    assert response.status_code == status
    message = response.json()["error"]["message"]
    assert value not in message and value[:20] in message


def test_uploads_past_the_bytes_in_flight_budget_get_429_before_being_read(painter, tmp_path):
    settings = Settings(files_dir=tmp_path)
    serving = ImagesServing(settings, painter, LocalFileStore(tmp_path, 60))
    app = create_app(lambda: serving, max_body_bytes=100_000, max_body_bytes_in_flight=150_000)
    budget = next(m.kwargs["budget"] for m in app.user_middleware if "budget" in m.kwargs)
    client = TestClient(app)
    budget.held = 120_000  # other uploads are being received
    response = client.post("/images/edits", files={"image": part(noise(128, 128))})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "uploads_busy"
    assert response.headers["x-should-retry"] == "true"
    budget.held = 0
    ok = client.post("/images/edits", files={"image": part(noise(64, 64))}, data={"prompt": "x"})
    assert ok.status_code == 200
    assert budget.held == 0  # every byte reserved was released


def test_clip_skip_reaches_the_job_and_a_bad_one_names_the_parameter(client, painter) -> None:
    response = client.post("/images/generations", json={"prompt": "x", "clip_skip": 2})
    assert response.status_code == 200
    assert painter.jobs[-1].params.clip_skip == 2
    client.post("/images/generations", json={"prompt": "x"})
    assert painter.jobs[-1].params.clip_skip == 1  # SDXL_CLIP_SKIP's default
    bad = client.post("/images/generations", json={"prompt": "x", "clip_skip": 3})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "clip_skip"
