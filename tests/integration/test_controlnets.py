"""ControlNet through the real service (`bentoml serve`, tiny preset) and the official openai
client: SDXL_CONTROLNET_DIR holds tiny ControlNets made from the tiny base's UNet (a diffusers
folder, single files, a Union one, one that fails to load, an SD 1.5 one); SDXL_UPSCALER_DIR a
tiny ESRGAN, for the upscale with ControlNet tile."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from sdxl_service.engine.tiny import ensure_tiny_pair
from tests import upscaler_files
from tests.controlnet_files import save_controlnets
from tests.decoded import decode, pixels
from tests.integration.test_jobs import wait_for_end
from tests.service_process import REPO, RunningService, running_service

pytestmark = pytest.mark.integration

SIZE = "128x128"


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The tiny base the service loads (start_service's cache).
    base_dir, _ = ensure_tiny_pair(REPO / ".cache" / "sdxl-service")
    return save_controlnets(tmp_path_factory.mktemp("controlnets"), base_dir)


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    upscaler_files.esrgan(folder / "tiny-esrgan.safetensors", scale=2)
    return folder


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, controlnet_dir: Path, upscaler_dir: Path
) -> Iterator[RunningService]:
    env = {
        "SDXL_CONTROLNET_DIR": str(controlnet_dir),
        "SDXL_UPSCALER_DIR": str(upscaler_dir),
        "SDXL_REFINER": "none",
    }
    with running_service(tmp_path_factory.mktemp("controlnet-service"), env) as running:
        yield running


@pytest.fixture(scope="module")
def client(service: RunningService) -> OpenAI:
    return OpenAI(base_url=service.api, api_key="any-string", max_retries=0, timeout=120)


@pytest.fixture
def http(service: RunningService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.api, timeout=120) as client:
        yield client


def control_b64(seed: int, width: int = 96, height: int = 64) -> str:
    blocks = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), np.uint8)
    array = np.repeat(np.repeat(blocks, 8, 0), 8, 1)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def generate(client: OpenAI, *units: dict, seed: int = 5) -> np.ndarray:
    answer = client.images.generate(
        prompt="a lighthouse",
        size=SIZE,
        response_format="b64_json",
        extra_body={"seed": seed, "controlnets": list(units)},
    )
    assert answer.data[0].b64_json is not None
    return pixels(answer.data[0].b64_json)


def test_models_lists_the_controlnets(http: httpx.Client) -> None:
    cards = {card["id"]: card for card in http.get("/models").json()["data"]}
    assert cards["edges"]["controlnet"] == {"name": "edges", "format": "diffusers", "union": False}
    assert cards["union"]["controlnet"]["union"] is True
    assert "not an SDXL ControlNet" in cards["sd15"]["warning"]


def test_a_control_image_steers_the_image_and_reproduces(client: OpenAI) -> None:
    plain = generate(client)
    edges = generate(client, {"name": "edges", "image": control_b64(1), "scale": 1.5})
    again = generate(client, {"name": "edges", "image": control_b64(1), "scale": 1.5})
    other = generate(client, {"name": "edges", "image": control_b64(2), "scale": 1.5})
    assert plain.shape == edges.shape == (128, 128, 3)
    assert np.array_equal(edges, again)
    assert np.abs(edges - plain).mean() > 1 and np.abs(edges - other).mean() > 1


def test_two_units_and_a_union_model_render(client: OpenAI) -> None:
    units = [
        {"name": "edges", "image": control_b64(1), "preprocessor": "canny", "end": 0.5},
        {"name": "depth", "image": f"data:image/png;base64,{control_b64(3)}", "scale": 0.5},
    ]
    assert generate(client, *units).shape == (128, 128, 3)
    union = {"name": "union", "image": control_b64(4), "mode": "depth"}
    assert generate(client, union, union | {"mode": "openpose"}).shape == (128, 128, 3)


def test_with_the_hires_fix_the_units_act_in_both_passes_at_the_final_size(
    client: OpenAI,
) -> None:
    unit = {"name": "edges", "image": control_b64(1), "preprocessor": "canny", "scale": 1.5}
    hires = {"scale": 2, "steps": 4, "denoising_strength": 0.6, "upscaler": "lanczos"}

    def made(*units: dict, seed: int = 5) -> tuple[np.ndarray, str]:
        answer = client.images.generate(
            prompt="a lighthouse",
            size=SIZE,
            response_format="b64_json",
            extra_body={"seed": seed, "hires": hires, "controlnets": list(units)},
        )
        b64 = answer.data[0].b64_json
        assert b64 is not None
        return pixels(b64), decode(b64).info["parameters"]

    controlled, text = made(unit)
    again, _ = made(unit)
    plain, _ = made()
    assert controlled.shape == (128, 128, 3)  # the final size; the first pass is 64x64
    assert np.array_equal(controlled, again)
    assert np.abs(controlled - plain).mean() > 1
    assert "Size: 64x64" in text and "Hires upscale: 2" in text and "Hr Option: Both" in text


def test_the_infotext_names_each_unit(client: OpenAI) -> None:
    answer = client.images.generate(
        prompt="a lighthouse",
        size=SIZE,
        response_format="b64_json",
        extra_body={"controlnets": [{"name": "depth", "image": control_b64(1)}]},
    )
    assert answer.data[0].b64_json is not None
    text = decode(answer.data[0].b64_json).info["parameters"]
    assert 'ControlNet 0: "Module: none, Model: depth, Weight: 1, Resize Mode: Crop' in text


def test_an_edit_takes_controlnets_as_a_form_field(http: httpx.Client) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (30, 90, 200)).save(buffer, "PNG")
    units = [{"name": "edges", "image": control_b64(1), "preprocessor": "canny"}]
    answer = http.post(
        "/images/edits",
        data={"prompt": "a lighthouse", "controlnets": json.dumps(units), "seed": "3"},
        files={"image": ("in.png", buffer.getvalue(), "image/png")},
    )
    assert answer.status_code == 200, answer.text
    assert pixels(answer.json()["data"][0]["b64_json"]).shape == (128, 128, 3)


def upscale(http: httpx.Client, units: list[dict] | None, **fields: str) -> httpx.Response:
    """A 64x48 picture at scale 2 through the tiny ESRGAN, then the denoising pass."""
    picture = base64.b64decode(control_b64(4, 64, 48))
    data = {"prompt": "a lighthouse", "scale": "2", "upscaler": "tiny-esrgan", "seed": "3"}
    if units is not None:
        data["controlnets"] = json.dumps(units)
    return http.post(
        "/images/upscale",
        data={**data, **fields},
        files={"image": ("in.png", picture, "image/png")},
    )


def test_an_upscale_through_an_upscaler_model_takes_a_tile_unit(http: httpx.Client) -> None:
    """The tile recipe as a raw multipart form: a Union unit in mode tile whose image is left
    out (the picture being upscaled); it steers the upscale, and reproduces."""
    tile = [{"name": "union", "mode": "tile", "scale": 1.5}]
    answers = [upscale(http, units, denoising_strength="0.6") for units in (tile, tile, None)]
    assert all(answer.status_code == 200 for answer in answers), answers[0].text
    steered, again, plain = (pixels(answer.json()["data"][0]["b64_json"]) for answer in answers)
    assert steered.shape == plain.shape == (96, 128, 3)
    assert np.array_equal(steered, again)
    assert np.abs(steered - plain).mean() > 1
    # Its own image, a plain ControlNet: the same size.
    own = [{"name": "edges", "image": control_b64(1)}]
    answer = upscale(http, own, denoising_strength="0.6")
    assert answer.status_code == 200, answer.text
    assert decode(answer.json()["data"][0]["b64_json"]).size == (128, 96)


def test_units_with_the_upscaler_model_alone_are_a_400_and_the_service_stays_up(
    http: httpx.Client,
) -> None:
    answer = upscale(http, [{"name": "edges"}], denoising_strength="0")
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "controlnets"
    answer = upscale(http, None, denoising_strength="0")
    assert answer.status_code == 200, answer.text


def test_an_only_masked_edit_steers_its_region_with_the_unit(http: httpx.Client) -> None:
    """inpaint_area only_masked with a unit: the map cut from the same region; another map
    changes the region, the picture outside it comes back as it was."""
    picture, mask = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (128, 128), (30, 90, 200)).save(picture, "PNG")
    transparent = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    transparent.paste((0, 0, 0, 0), (80, 80, 112, 112))
    transparent.save(mask, "PNG")
    answers = []
    for control in (1, 2):
        units = [{"name": "edges", "image": control_b64(control, 128, 128)}]
        answer = http.post(
            "/images/edits",
            data={
                "prompt": "a lighthouse",
                "controlnets": json.dumps(units),
                "seed": "3",
                "inpaint_area": "only_masked",
                "mask_blur": "2",
            },
            files={
                "image": ("in.png", picture.getvalue(), "image/png"),
                "mask": ("mask.png", mask.getvalue(), "image/png"),
            },
        )
        assert answer.status_code == 200, answer.text
        answers.append(pixels(answer.json()["data"][0]["b64_json"]))
    assert all((image[:64, :64] == (30, 90, 200)).all() for image in answers)
    assert np.abs(answers[0][84:108, 84:108] - answers[1][84:108, 84:108]).mean() > 0


def test_bad_units_are_400s_naming_the_parameter_and_the_service_stays_up(
    http: httpx.Client, client: OpenAI
) -> None:
    cases = [
        (
            {"name": "absent", "image": control_b64(1)},
            "controlnets[0].name",
            "controlnet_not_found",
        ),
        ({"name": "sd15", "image": control_b64(1)}, "controlnets[0].name", "invalid_controlnet"),
        ({"name": "edges", "image": "https://example.com/a.png"}, "controlnets[0].image", None),
        ({"name": "edges", "image": control_b64(1), "mode": 1}, "controlnets[0].mode", None),
        # Listed, but its weights do not load: the render worker's answer.
        ({"name": "broken", "image": control_b64(1)}, "controlnets", "invalid_controlnet"),
    ]
    for unit, param, code in cases:
        answer = http.post(
            "/images/generations", json={"prompt": "x", "size": SIZE, "controlnets": [unit]}
        )
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == param
        assert code is None or error["code"] == code
    assert generate(client, {"name": "depth", "image": control_b64(1)}).shape == (128, 128, 3)


def test_an_image_job_with_controlnets_ends_with_the_synchronous_answer(
    http: httpx.Client,
) -> None:
    units = [{"name": "edges", "image": control_b64(1), "preprocessor": "canny"}]
    body = {"prompt": "a lighthouse", "size": SIZE, "seed": 12, "controlnets": units}
    submitted = http.post("/images/jobs", json=body)
    assert submitted.status_code == 202, submitted.text
    job = wait_for_end(http, submitted.json()["id"])
    assert job["status"] == "succeeded", job
    sync = http.post("/images/generations", json=body).json()
    assert np.array_equal(
        pixels(job["result"]["data"][0]["b64_json"]), pixels(sync["data"][0]["b64_json"])
    )


LEGACY = """
import base64, io, json, sys
import openai
from PIL import Image
openai.api_base, openai.api_key = sys.argv[1], "any"
unit = {"name": "edges", "image": sys.argv[2]}
made = openai.Image.create(prompt="a lighthouse", size="128x128", seed=5, controlnets=[unit])
edit = openai.Image.create_edit(
    image=open(sys.argv[3], "rb"), prompt="a lighthouse", size="128x128", seed=5,
    controlnets=json.dumps([unit]),
)
pictures = [Image.open(io.BytesIO(base64.b64decode(a["data"][0]["b64_json"]))).convert("RGB")
            for a in (made, edit)]
print(json.dumps({"sizes": [list(p.size) for p in pictures],
                  "made": base64.b64encode(pictures[0].tobytes()).decode()}))
"""


def test_the_legacy_client_sends_units_as_a_keyword_and_a_form_field(
    client: OpenAI, tmp_path: Path
) -> None:
    """openai 0.28, as the README shows it: `controlnets=` goes into a generation's JSON body,
    and into an edit's form as JSON text; the generation is the openai 3.x one's, pixel for
    pixel."""
    from tests.integration.test_legacy_client import run_legacy

    image = control_b64(11)
    picture = tmp_path / "picture.png"
    Image.new("RGB", (128, 128), (30, 120, 200)).save(picture)
    out = run_legacy(LEGACY, str(client.base_url).rstrip("/"), image, str(picture))
    assert out["sizes"] == [[128, 128], [128, 128]]
    expected = generate(client, {"name": "edges", "image": image}, seed=5)
    made = np.frombuffer(base64.b64decode(out["made"]), np.uint8).reshape(expected.shape)
    assert np.array_equal(made, expected)
