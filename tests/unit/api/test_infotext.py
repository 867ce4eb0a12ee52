"""How an image was made, in AUTOMATIC1111's infotext, written into PNG, JPEG and WebP.

Read back with A1111's own published rules (api/infotext_reader.py, as modules/infotext_utils.py
`parse_generation_parameters` reads: the last line must yield at least three `key: value`
pairs, values in double quotes are JSON strings) and ComfyUI's import rule (the
parameters begin at the last "\\nSteps:").
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdxl_service.api.app import create_app
from sdxl_service.api.encoding import encode_image
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.infotext import Provenance, infotext, png_with_text, quote
from sdxl_service.api.infotext_reader import parse_infotext
from sdxl_service.api.serving import ImagesServing
from sdxl_service.choices import HiresUpscaler, RefinerMode, RenderKind
from sdxl_service.contract.render_request import HiresParams, LoraWeight, RenderRequest
from sdxl_service.settings import Settings
from tests.jobs import make_params
from tests.unit.api.test_serving import SeedPainter

PROVENANCE = Provenance(
    base_model="stabilityai/stable-diffusion-xl-base-1.0",
    refiner_model="/models/sd_xl_refiner_1.0.safetensors",
    lora_hashes={"style": "0123456789ab", "other.v2": "ba9876543210"},
    version="sdxl-service 1.1.0",
)


def job(**overrides) -> RenderRequest:
    values = {
        "request_id": "r",
        "params": make_params(
            width=1024, height=1024, num_inference_steps=30, scheduler="dpmpp_2m_karras"
        ),
        "prompt": "a red fox, in the snow: at dusk",
        "negative_prompt": "blurry",
        "seeds": [7],
    }
    return RenderRequest(**{**values, **overrides})


def test_the_last_line_yields_every_key_to_a1111s_parser() -> None:
    loras = (LoraWeight(name="other.v2", scale=0.5), LoraWeight(name="style", scale=1.0))
    text = infotext(
        job(params=make_params(num_inference_steps=30, scheduler="dpmpp_2m_karras", loras=loras)),
        PROVENANCE,
        seed=8,
        width=832,
        height=1216,
    )
    assert parse_infotext(text) == {
        # A1111's prompt names its LoRAs, by tags the request's `loras` become.
        "Prompt": "a red fox, in the snow: at dusk <lora:other.v2:0.5> <lora:style:1>",
        "Negative prompt": "blurry",
        "Steps": "30",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "5.0",
        "Seed": "8",
        "Size": "832x1216",
        "Model": "stable-diffusion-xl-base-1.0",
        "Refiner": "sd_xl_refiner_1.0",
        "Refiner switch at": "0.8",
        "Lora hashes": "style: 0123456789ab, other.v2: ba9876543210",
        "Version": "sdxl-service 1.1.0",
    }
    # ComfyUI and others: the settings are what follows the last "\nSteps:".
    assert text.rsplit("\nSteps: ", 1)[1].startswith("30, Sampler: DPM++ 2M")


def test_an_edit_says_its_strength_and_base_only_names_no_refiner() -> None:
    params = make_params(
        kind=RenderKind.IMAGE_TO_IMAGE, strength=0.6, refiner=RefinerMode.NONE, scheduler="euler"
    )
    edit = job(params=params, negative_prompt="", init_image=bytes(64 * 64 * 3))
    plain = Provenance(base_model="/models/my-finetune.safetensors", refiner_model="r")
    parsed = parse_infotext(infotext(edit, plain, seed=1, width=64, height=64))
    assert parsed["Denoising strength"] == "0.6" and parsed["Sampler"] == "Euler"
    assert parsed["Model"] == "my-finetune"
    assert "Refiner" not in parsed and "Schedule type" not in parsed
    assert parsed["Negative prompt"] == "" and "Lora hashes" not in parsed
    assert "Clip skip" not in parsed
    skipped = job(params=make_params(clip_skip=2))
    assert parse_infotext(infotext(skipped, plain, seed=1, width=64, height=64))["Clip skip"] == "2"


def test_a_hires_render_says_it_as_a1111_does() -> None:
    hires = HiresParams(
        first_width=512,
        first_height=512,
        scale=2.0,
        steps=12,
        denoising_strength=0.55,
        upscaler=HiresUpscaler.LATENT,
    )
    params = make_params(width=1024, height=1024, hires=hires)
    plain = Provenance(base_model="b", refiner_model="r")
    parsed = parse_infotext(infotext(job(params=params), plain, seed=1, width=1024, height=1024))
    # A1111's Size is the first pass's; its hires fields take it to the final size.
    assert parsed["Size"] == "512x512"
    assert (parsed["Hires upscale"], parsed["Hires steps"], parsed["Hires upscaler"]) == (
        "2.0",
        "12",
        "Latent",
    )
    assert parsed["Denoising strength"] == "0.55"


@pytest.mark.parametrize(
    ("value", "quoted"),
    [("plain", "plain"), ("a, b", '"a, b"'), ("k: v", '"k: v"'), ('é\n"x"', '"é\\n\\"x\\""')],
)
def test_values_are_quoted_as_a1111_quotes_them(value: str, quoted: str) -> None:
    assert quote(value) == quoted


@pytest.mark.parametrize("prompt", ["a lighthouse at dusk", "un phare au crépuscule, 灯台"])
def test_a_png_carries_the_text_as_its_parameters_chunk(prompt: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), np.uint8)
    text = infotext(job(prompt=prompt), PROVENANCE, seed=7, width=24, height=16)
    png = encode_image(pixels, "png", infotext=text)
    with Image.open(io.BytesIO(png)) as image:
        image.load()  # a bad chunk CRC fails here
        assert image.text["parameters"] == text
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels)
    assert png_with_text(encode_image(pixels, "png"), text) == png


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_jpeg_and_webp_carry_it_as_exif_user_comment(output_format: str) -> None:
    text = infotext(job(prompt="灯台, at dusk"), PROVENANCE, seed=7, width=24, height=16)
    data = encode_image(Image.new("RGB", (24, 16), (1, 2, 3)), output_format, infotext=text)
    with Image.open(io.BytesIO(data)) as image:
        comment = image.getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\0")
    assert comment[8:].decode("utf-16-be") == text


def served(tmp_path, **settings: object) -> tuple[TestClient, SeedPainter]:
    painter = SeedPainter()
    config = Settings(files_dir=tmp_path, max_body_bytes=10_000, **settings)
    serving = ImagesServing(config, painter, LocalFileStore(tmp_path, 60))
    return TestClient(create_app(lambda: serving, config.max_body_bytes)), painter


def test_answers_carry_each_images_own_seed_and_can_be_turned_off(tmp_path) -> None:
    client, _ = served(tmp_path)
    body = {"prompt": "a red fox", "size": "64x64", "n": 2, "seed": 40, "scheduler": "euler"}
    answer = client.post("/images/generations", json=body).json()
    seeds = []
    for item in answer["data"]:
        with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
            parsed = parse_infotext(image.text["parameters"])
        assert parsed["Prompt"] == "a red fox" and parsed["Size"] == "64x64"
        seeds.append(int(parsed["Seed"]))
    assert seeds == [item["seed"] for item in answer["data"]] == [40, 41]

    quiet, _ = served(tmp_path, image_metadata=False)
    item = quiet.post("/images/generations", json=body).json()["data"][0]
    with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
        assert "parameters" not in image.text


def test_lora_hashes_are_the_files_sha256_as_a1111_shortens_it(tmp_path) -> None:
    import hashlib

    from sdxl_service.lora_catalog import LoraCatalog

    data = b"not really a LoRA, but a file all the same" * 1000
    (tmp_path / "style.safetensors").write_bytes(data)
    catalog = LoraCatalog(tmp_path)
    entry = catalog.find("style")
    assert entry is not None
    assert catalog.short_hash(entry) == hashlib.sha256(data).hexdigest()[:12]
    (tmp_path / "style.safetensors").write_bytes(data + b"!")  # a new version, a new hash
    assert catalog.short_hash(entry) == hashlib.sha256(data + b"!").hexdigest()[:12]
    entry.path.unlink()
    assert catalog.short_hash(entry) is None


@pytest.mark.parametrize(
    ("scheduler", "schedule_type", "sampler", "schedule"),
    [
        ("dpmpp_2m_sde_karras", None, "DPM++ 2M SDE", "Karras"),
        ("dpmpp_sde", None, "DPM++ SDE", None),
        ("dpmpp_3m_sde", "exponential", "DPM++ 3M SDE", "Exponential"),
        ("euler_a_karras", None, "Euler a", "Karras"),
        ("dpm2_a", "sgm_uniform", "DPM2 a", "SGM Uniform"),
        ("DPM++ 2M SDE", "Karras", "DPM++ 2M SDE", "Karras"),
        ("heun", None, "Heun", None),
    ],
)
def test_a_pngs_sampler_and_schedule_type_read_back_into_the_same_render(
    tmp_path, scheduler: str, schedule_type: str | None, sampler: str, schedule: str | None
) -> None:
    """A1111's names in the infotext; given back as `scheduler` and `schedule_type`, they make
    a render of the same scheduler and schedule, and the same infotext."""
    client, painter = served(tmp_path)
    body = {"prompt": "a red fox", "size": "64x64", "seed": 4, "scheduler": scheduler}
    if schedule_type is not None:
        body["schedule_type"] = schedule_type
    first = client.post("/images/generations", json=body)
    assert first.status_code == 200, first.text
    with Image.open(io.BytesIO(base64.b64decode(first.json()["data"][0]["b64_json"]))) as image:
        text = image.text["parameters"]
    read = parse_infotext(text)
    assert read["Sampler"] == sampler
    assert read.get("Schedule type") == schedule
    again = {"prompt": read["Prompt"], "size": read["Size"], "seed": int(read["Seed"])}
    again["scheduler"] = read["Sampler"]
    if "Schedule type" in read:
        again["schedule_type"] = read["Schedule type"]
    second = client.post("/images/generations", json=again)
    assert second.status_code == 200, second.text
    with Image.open(io.BytesIO(base64.b64decode(second.json()["data"][0]["b64_json"]))) as image:
        assert image.text["parameters"] == text
    # The same diffusers class and options: the same pixels (tests/unit/engine/test_engine.py).
    from sdxl_service.engine.schedulers import SCHEDULERS, scheduler_options

    made = [(job.params.scheduler, job.params.schedule_type) for job in painter.jobs]
    assert len({SCHEDULERS[name].class_name for name, _ in made}) == 1
    assert scheduler_options(*made[0]) == scheduler_options(*made[1])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"scheduler": "DPM++ 9M"}, "scheduler"),
        ({"schedule_type": "Polyexponential"}, "schedule_type"),
        ({"scheduler": "lcm", "schedule_type": "karras"}, "schedule_type"),
        ({"scheduler": "DDIM", "schedule_type": "Exponential"}, "schedule_type"),
    ],
)
def test_a_bad_sampler_or_schedule_type_is_a_400_naming_it(
    tmp_path, body: dict[str, str], param: str
) -> None:
    client, painter = served(tmp_path)
    answer = client.post("/images/generations", json={"prompt": "a fox", **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert painter.jobs == []
