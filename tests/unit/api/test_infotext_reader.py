"""POST /v1/images/infotext and api/infotext_reader.py: an image's AUTOMATIC1111 infotext read
back, as A1111's PNG Info reads it, into a request that makes the same render again."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin
from safetensors.numpy import save_file

from sdxl_service.api.app import create_app
from sdxl_service.api.encoding import encode_image
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.infotext import exif_with_text, model_name, png_with_text
from sdxl_service.api.infotext_reader import (
    Catalogue,
    generation_request,
    parse_infotext,
    read_infotext,
)
from sdxl_service.api.serving import ImagesServing
from sdxl_service.settings import Settings
from tests.unit.api.test_serving import SeedPainter

# As AUTOMATIC1111 1.10 writes them (its create_infotext): LoRA tags in the prompt, their
# hashes quoted (a value with a comma and colons), a hires fix, a ControlNet unit.
A1111_TXT2IMG = (
    "masterpiece, a castle on a hill, (sunset:1.2) <lora:add-detail-xl:0.8>\n"
    "Negative prompt: lowres, bad anatomy, text\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, "
    "Size: 832x1216, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Denoising strength: 0.45, "
    "Clip skip: 2, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent, "
    'Lora hashes: "add-detail-xl: 9c783c8ce46c, other: 0123456789ab", '
    'ControlNet 0: "Module: canny, Model: diffusers_xl_canny_mid [112a778d], Weight: 1.0", '
    'TI hashes: "negXL: 6e8f2a8c4b7d", Version: v1.10.1'
)
A1111_INPAINT = (
    "a cat\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, "
    "Size: 1024x1024, Model hash: 31e35c80fc, Model: juggernautXL_v9, Denoising strength: 0.75, "
    "Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, Version: v1.10.1"
)
CATALOGUE = Catalogue(default_model="sd_xl_base_1.0", models={"juggernautXL_v9"})


def test_a1111s_own_infotext_reads_to_its_fields() -> None:
    parsed = parse_infotext(A1111_TXT2IMG)
    assert parsed["Prompt"] == (
        "masterpiece, a castle on a hill, (sunset:1.2) <lora:add-detail-xl:0.8>"
    )
    assert parsed["Negative prompt"] == "lowres, bad anatomy, text"
    assert parsed["Lora hashes"] == "add-detail-xl: 9c783c8ce46c, other: 0123456789ab"
    assert parsed["ControlNet 0"] == (
        "Module: canny, Model: diffusers_xl_canny_mid [112a778d], Weight: 1.0"
    )
    assert (parsed["Size"], parsed["Schedule type"], parsed["Version"]) == (
        "832x1216",
        "Karras",
        "v1.10.1",
    )


def test_a1111s_infotext_becomes_this_services_request() -> None:
    request, unused = generation_request(parse_infotext(A1111_TXT2IMG), CATALOGUE)
    assert request == {
        # The LoRA stays a tag: the service reads `<lora:name:w>` as A1111 does.
        "prompt": "masterpiece, a castle on a hill, (sunset:1.2) <lora:add-detail-xl:0.8>",
        "negative_prompt": "lowres, bad anatomy, text",
        "num_inference_steps": 28,
        "guidance_scale": 6.5,
        "seed": 1234567890,
        "clip_skip": 2,
        # "DPM++ 2M" with "Karras" is this service's dpmpp_2m_karras.
        "scheduler": "dpmpp_2m_karras",
        "size": "1248x1824",
        "hires": {"scale": 1.5, "steps": 12, "denoising_strength": 0.45, "upscaler": "latent"},
        # No "Refiner" field: A1111 rendered without one. The default model: no `model`.
        "refiner": "none",
    }
    assert unused == ["ControlNet 0"]

    request, unused = generation_request(parse_infotext(A1111_INPAINT), CATALOGUE)
    assert request["model"] == "juggernautXL_v9" and request["scheduler"] == "euler_a"
    assert request["size"] == "1024x1024" and "hires" not in request
    # An inpainting's options and strength have no place in a generation.
    assert unused == ["Denoising strength", "Mask blur", "Inpaint area", "Masked area padding"]


def test_unknown_names_and_refused_values_are_listed_not_sent() -> None:
    text = (
        "a cat\nSteps: 500, Sampler: Restart, Schedule type: Beta, CFG scale: 7, Seed: 5, "
        "Size: 512x512, Model: some-other-model, VAE: sdxl_vae.safetensors, "
        "Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+"
    )
    request, unused = generation_request(parse_infotext(text), CATALOGUE)
    assert request == {
        "prompt": "a cat",
        "guidance_scale": 7.0,
        "seed": 5,
        "size": "1024x1024",
        "hires": {"scale": 2.0},
        "refiner": "none",
    }
    unknown = ["Steps", "Sampler", "Schedule type", "Model", "VAE", "Hires upscaler"]
    assert sorted(unused) == sorted(unknown)
    # An upscaler model this server has is named as it is.
    request, unused = generation_request(
        parse_infotext(text), Catalogue(default_model="m", upscalers={"R-ESRGAN 4x+"})
    )
    assert request["hires"] == {"scale": 2.0, "upscaler": "R-ESRGAN 4x+"}
    assert "Hires upscaler" not in unused


def test_a_prompt_with_steps_in_it_stays_the_prompt() -> None:
    text = (
        "Steps: 5, Sampler: Euler, CFG scale: 3, a poster that says so\n"
        "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"
    )
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "Steps: 5, Sampler: Euler, CFG scale: 3, a poster that says so"
    assert parsed["Steps"] == "20"
    # Fewer than three pairs on the last line: all of it is prompt, as A1111 reads it.
    assert parse_infotext("a cat\nat night: dark") == {
        "Prompt": "a cat\nat night: dark",
        "Negative prompt": "",
    }


def served(tmp_path: Path, **settings: object) -> tuple[TestClient, SeedPainter]:
    painter = SeedPainter()
    config = Settings(files_dir=tmp_path / "files", max_body_bytes=4_000_000, **settings)
    serving = ImagesServing(config, painter, LocalFileStore(tmp_path / "files", 60))
    return TestClient(create_app(lambda: serving, config.max_body_bytes)), painter


def read_back(client: TestClient, data: bytes, name: str = "image.png") -> dict:
    answer = client.post("/images/infotext", files={"image": (name, data)})
    assert answer.status_code == 200, answer.text
    return answer.json()


def lora_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    folder.mkdir()
    weight = np.ones((4, 8), np.float32)
    save_file(
        {"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": weight},
        str(folder / "ink.safetensors"),
    )
    return folder


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_an_answer_read_back_asks_for_the_same_render(tmp_path: Path, output_format: str) -> None:
    client, painter = served(tmp_path, lora_dir=lora_folder(tmp_path))
    first = client.post(
        "/images/generations",
        json={
            "prompt": "a lighthouse, at dusk: oil on canvas",
            "negative_prompt": "blurry, lowres",
            "size": "136x128",
            "seed": 77,
            "num_inference_steps": 7,
            "guidance_scale": 4.5,
            "scheduler": "dpmpp_3m_sde",
            "schedule_type": "exponential",
            "clip_skip": 2,
            "high_noise_frac": 0.7,
            "loras": [{"name": "ink", "scale": 0.6}],
            "hires": {"scale": 1.5, "steps": 3, "denoising_strength": 0.5, "upscaler": "lanczos"},
            "output_format": output_format,
        },
    )
    assert first.status_code == 200, first.text
    data = base64.b64decode(first.json()["data"][0]["b64_json"])
    read = read_back(client, data, f"image.{output_format}")
    assert read["parameters"]["Hires resize"] == "136x128"
    assert read["unused"] == []
    assert read["request"]["prompt"].endswith(" <lora:ink:0.6>")
    again = client.post("/images/generations", json=read["request"])
    assert again.status_code == 200, again.text
    made, remade = painter.jobs
    assert remade.params == made.params
    assert (remade.prompt, remade.negative_prompt, remade.seeds) == (
        made.prompt,
        made.negative_prompt,
        made.seeds,
    )
    data_again = base64.b64decode(again.json()["data"][0]["b64_json"])
    assert read_back(client, data_again)["infotext"] == read["infotext"]


def test_an_image_without_infotext_answers_null(tmp_path: Path) -> None:
    client, _ = served(tmp_path)
    plain = encode_image(np.zeros((16, 16, 3), np.uint8), "png")
    assert read_back(client, plain) == {
        "infotext": None,
        "parameters": {},
        "request": {},
        "unused": [],
    }


def assert_bad_image(answer, param: str = "image") -> None:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_what_is_not_an_image_is_a_400_naming_image(tmp_path: Path) -> None:
    client, _ = served(tmp_path)
    assert_bad_image(client.post("/images/infotext", files={"image": ("a.txt", b"hello")}))
    assert_bad_image(client.post("/images/infotext", files={"image": ("a.png", b"")}))
    assert_bad_image(client.post("/images/infotext", files={"other": ("a.png", b"x")}))
    assert_bad_image(client.post("/images/infotext"))
    # The upload limit of every image endpoint (SDXL_MAX_BODY_BYTES).
    huge = client.post(
        "/images/infotext", files={"image": ("a.png", b"\x89PNG" + bytes(5_000_000))}
    )
    assert huge.status_code == 413


def test_hostile_files_never_fail_the_server(tmp_path: Path) -> None:
    client, _ = served(tmp_path)
    png = encode_image(np.zeros((16, 16, 3), np.uint8), "png")
    text = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 16x16"
    # Truncated after its text chunk: the text is read, as A1111 reads it.
    tagged = png_with_text(png, text)
    assert read_back(client, tagged[: len(tagged) - 30])["parameters"]["Steps"] == "20"
    # Truncated in its header: no image.
    assert_bad_image(client.post("/images/infotext", files={"image": ("a.png", png[:20])}))
    # A text chunk of 2 MB (Pillow reads it; the body limit bounds it).
    start = time.monotonic()
    big = png_with_text(png, "x" * 1_200_000 + "\n" + " " * 1_000_000)
    answer = client.post("/images/infotext", files={"image": ("a.png", big)})
    assert answer.status_code == 200 and time.monotonic() - start < 10
    assert answer.json()["parameters"]["Prompt"] == "x" * 1_200_000
    # A long last line of spaces and words: read in linear time.
    start = time.monotonic()
    answer = read_back(client, png_with_text(png, "a cat\n" + "word " * 150_000 + " " * 100_000))
    assert time.monotonic() - start < 10 and answer["parameters"]["Prompt"].startswith("a cat")
    # EXIF UserComment that is not UTF-16 nor UTF-8, and one with an odd number of bytes.
    for comment in (b"\xff\xfe\x80\x81 Steps: 1, a: 2, b: 3", b"UNICODE\0\xd8\x00\x00"):
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = comment
        jpeg = io.BytesIO()
        Image.new("RGB", (8, 8)).save(jpeg, format="JPEG", exif=exif.tobytes())
        answer = client.post("/images/infotext", files={"image": ("a.jpg", jpeg.getvalue())})
        assert answer.status_code == 200, answer.text


def test_jpeg_and_webp_read_exif_as_a1111_writes_it() -> None:
    text = "灯台, at dusk\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 16x16"
    for image_format in ("JPEG", "WEBP"):
        out = io.BytesIO()
        Image.new("RGB", (16, 16)).save(out, format=image_format, exif=exif_with_text(text))
        assert read_infotext(out.getvalue()) == text
    # Pillow's own PNG text (tEXt, zTXt and iTXt), as A1111 saves its PNGs.
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text, zip=True)
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, format="PNG", pnginfo=info)
    assert read_infotext(out.getvalue()) == text


def test_a_text_chunk_after_the_pixels_is_read_too() -> None:
    png = encode_image(np.zeros((16, 16, 3), np.uint8), "png")
    text = b"parameters\0a cat\nSteps: 20, Sampler: Euler, CFG scale: 7"
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + text))
    at_end = png[:-12] + chunk + png[-12:]  # before IEND
    assert read_infotext(at_end) == text.split(b"\0", 1)[1].decode()


def test_model_is_sent_when_this_server_has_it(tmp_path: Path) -> None:
    from tests.unit.api.test_model_requests import base_file

    folder = tmp_path / "models"
    folder.mkdir()
    base_file(folder / "plain.safetensors")
    client, _ = served(tmp_path, models_dir=folder)
    png = encode_image(np.zeros((16, 16, 3), np.uint8), "png")
    fields = "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model:"
    default = model_name(Settings().base_model)
    for model, expected in (("plain", "plain"), (default, None), ("elsewhere", None)):
        read = read_back(client, png_with_text(png, f"a cat\n{fields} {model}"))
        assert read["request"].get("model") == expected
        assert ("Model" in read["unused"]) == (model == "elsewhere")
