"""ControlNet units through the HTTP process: listed, checked, their control images decoded,
fitted and preprocessed into the render request; the render worker is a fake (the HTTP
process never imports torch). Every bad unit is a 400 naming its parameter by its path."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin
from safetensors.numpy import save_file

from sdxl_service.api.app import create_app
from sdxl_service.api.control_maps import fit_crop_and_resize
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.jobs.submissions import SUBMISSIONS
from sdxl_service.api.serving import ImagesServing
from sdxl_service.settings import Settings
from tests.decoded import decode
from tests.unit.api.test_serving import SeedPainter
from tests.unit.api.test_upscalers_api import DescribingPainter

SIZE = "128x128"


def controlnet_state(*, union: bool = False, cross: int = 64, sdxl: bool = True) -> dict:
    """The header-relevant tensors of a diffusers-layout ControlNet file (tiny shapes)."""
    state = {
        "controlnet_cond_embedding.conv_in.weight": np.zeros((16, 3, 3, 3), np.float32),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": np.zeros(
            (32, cross), np.float32
        ),
    }
    if sdxl:
        state["add_embedding.linear_1.weight"] = np.zeros((8, 8), np.float32)
    if union:
        state["task_embedding"] = np.zeros((8, 16), np.float32)
    return state


def write_folder(folder: Path, name: str, **config: Any) -> None:
    (folder / name).mkdir()
    base = {
        "_class_name": "ControlNetModel",
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
    }
    (folder / name / "config.json").write_text(json.dumps({**base, **config}))
    (folder / name / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    folder = tmp_path / "controlnets"
    folder.mkdir()
    write_folder(folder, "canny-sdxl")
    write_folder(folder, "sd15-canny", cross_attention_dim=768, addition_embed_type=None)
    save_file(controlnet_state(), str(folder / "depth.safetensors"))
    save_file(controlnet_state(union=True), str(folder / "union.safetensors"))
    save_file(controlnet_state(cross=768, sdxl=False), str(folder / "sd15-depth.safetensors"))
    return folder


@pytest.fixture
def painter() -> SeedPainter:
    return SeedPainter()


def make_client(painter: SeedPainter, tmp_path: Path, **settings: Any) -> TestClient:
    config = Settings(files_dir=tmp_path / "files", **settings)
    serving = ImagesServing(config, painter, LocalFileStore(tmp_path / "files", 60))
    return TestClient(create_app(lambda: serving, config.max_body_bytes))


@pytest.fixture
def client(painter: SeedPainter, folder: Path, tmp_path: Path) -> TestClient:
    return make_client(painter, tmp_path, controlnet_dir=folder)


def picture_b64(width: int = 64, height: int = 32, *, data_url: bool = False) -> str:
    """A picture with a white square in its centre (edges for canny)."""
    array = np.zeros((height, width, 3), np.uint8)
    array[height // 4 : 3 * height // 4, width // 2 - height // 4 : width // 2 + height // 4] = 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def generate(client: TestClient, *units: dict[str, Any], **extra: Any) -> Any:
    body = {"prompt": "a fox", "size": SIZE, "controlnets": list(units), **extra}
    return client.post("/images/generations", json=body)


def error_of(response: Any) -> tuple[str, str]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    return error["param"], error["code"]


def test_models_lists_each_controlnet_and_why_one_cannot_be_used(client: TestClient) -> None:
    cards = {card["id"]: card for card in client.get("/models").json()["data"]}
    assert cards["canny-sdxl"]["owned_by"] == "controlnet_dir"
    assert cards["canny-sdxl"]["controlnet"] == {
        "name": "canny-sdxl",
        "format": "diffusers",
        "union": False,
    }
    assert cards["union"]["controlnet"]["union"] is True
    assert cards["union"]["controlnet"]["control_types"] == 8
    assert cards["depth"].get("warning") is None
    assert "not an SDXL ControlNet" in cards["sd15-canny"]["warning"]
    assert "not an SDXL ControlNet" in cards["sd15-depth"]["warning"]


def test_a_new_file_is_listed_without_a_restart(client: TestClient, folder: Path) -> None:
    save_file(controlnet_state(), str(folder / "later.safetensors"))
    ids = [card["id"] for card in client.get("/models").json()["data"]]
    assert "later" in ids


def test_units_travel_in_the_render_request_with_their_control_images(
    client: TestClient, painter: SeedPainter
) -> None:
    units = [
        {"name": "canny-sdxl", "image": picture_b64(), "scale": 0.5, "start": 0.1, "end": 0.8},
        {"name": "depth", "image": picture_b64(data_url=True), "preprocessor": "canny"},
    ]
    response = generate(client, *units, n=2)
    assert response.status_code == 200, response.text
    job = painter.jobs[-1]
    first, second = job.params.controlnets
    assert (first.name, first.scale, first.start, first.end, first.mode) == (
        "canny-sdxl",
        0.5,
        0.1,
        0.8,
        None,
    )
    assert (second.name, second.scale, second.start, second.end) == ("depth", 1.0, 0.0, 1.0)
    width, height = job.params.width, job.params.height
    assert [len(image) for image in job.control_images] == [3 * width * height] * 2
    fitted = np.frombuffer(job.control_images[0], np.uint8).reshape(height, width, 3)
    edges = np.frombuffer(job.control_images[1], np.uint8).reshape(height, width, 3)
    # 64x32 covers 128x128 at 4x (256x128), cropped to its centre: the 16x16 square is
    # 64x64 in the middle, a quarter of the map.
    assert (fitted[40:88, 40:88] == 255).all() and (fitted[:24] == 0).all()
    assert 60 < fitted.mean() < 68
    # canny's map: white edges on black.
    assert set(np.unique(edges)) == {0, 255}


def test_each_unit_has_infotext_as_a1111s_controlnet_extension_writes_it(
    client: TestClient,
) -> None:
    unit = {"name": "depth", "image": picture_b64(), "preprocessor": "canny", "scale": 0.75}
    response = generate(client, unit)
    image = decode(response.json()["data"][0]["b64_json"])
    assert isinstance(image, PngImagePlugin.PngImageFile)
    text = image.text["parameters"]
    assert (
        'ControlNet 0: "Module: canny, Model: depth, Weight: 0.75, Resize Mode: Crop and Resize, '
        "Low Vram: False, Processor Res: 128, Threshold A: 100, Threshold B: 200, "
        'Guidance Start: 0, Guidance End: 1, Pixel Perfect: True, Control Mode: Balanced"'
    ) in text


def test_a_union_unit_takes_its_mode_by_name_or_number(
    client: TestClient, painter: SeedPainter
) -> None:
    for mode, expected in (("depth", 1), (3, 3), ("7", 7)):
        response = generate(client, {"name": "union", "image": picture_b64(), "mode": mode})
        assert response.status_code == 200, response.text
        assert painter.jobs[-1].params.controlnets[0].mode == expected


@pytest.mark.parametrize(
    ("unit", "param", "code"),
    [
        ({"name": "absent"}, "controlnets[0].name", "controlnet_not_found"),
        ({"name": "sd15-canny"}, "controlnets[0].name", "invalid_controlnet"),
        ({"name": "sd15-depth"}, "controlnets[0].name", "invalid_controlnet"),
        ({"mode": "depth"}, "controlnets[0].mode", "invalid_value"),
        ({"name": "union"}, "controlnets[0].mode", "invalid_value"),
        ({"name": "union", "mode": "pose"}, "controlnets[0].mode", "invalid_value"),
        ({"name": "union", "mode": 8}, "controlnets[0].mode", "invalid_value"),
        ({"start": 0.6, "end": 0.5}, "controlnets[0].start", "invalid_value"),
        ({"start": 0.5, "end": 0.5}, "controlnets[0].start", "invalid_value"),
        ({"scale": 2.5}, "controlnets[0].scale", "invalid_value"),
        ({"end": 1.5}, "controlnets[0].end", "invalid_value"),
        ({"preprocessor": "depth_midas"}, "controlnets[0].preprocessor", "invalid_value"),
        ({"preprocessor": "canny", "low": 200, "high": 100}, "controlnets[0]", "invalid_value"),
        ({"image": "not base64!"}, "controlnets[0].image", "invalid_value"),
        ({"image": base64.b64encode(b"not a picture").decode()}, "controlnets[0].image", None),
        ({"image": "https://example.com/pose.png"}, "controlnets[0].image", "invalid_value"),
        ({"weight": 1}, "controlnets[0].weight", "invalid_value"),
    ],
)
def test_a_bad_unit_is_a_400_naming_its_parameter(
    client: TestClient, painter: SeedPainter, unit: dict, param: str, code: str | None
) -> None:
    good = {"name": "canny-sdxl", "image": picture_b64()}
    got_param, got_code = error_of(generate(client, {**good, **unit}))
    assert got_param == param
    assert code is None or got_code == code
    assert not painter.jobs


def test_the_second_units_image_is_named_as_the_second(client: TestClient) -> None:
    good = {"name": "canny-sdxl", "image": picture_b64()}
    assert error_of(generate(client, good, {**good, "image": "@@"}))[0] == "controlnets[1].image"


def test_an_oversized_control_image_is_refused(client: TestClient) -> None:
    # 20000 x 20000 pixels of PNG header: more than any upload may hold.
    huge = Image.new("1", (20000, 20000))
    buffer = io.BytesIO()
    huge.save(buffer, "PNG")
    unit = {"name": "canny-sdxl", "image": base64.b64encode(buffer.getvalue()).decode()}
    param, _ = error_of(generate(client, unit))
    assert param == "controlnets[0].image"


def test_more_units_than_the_server_allows_are_refused(
    painter: SeedPainter, folder: Path, tmp_path: Path
) -> None:
    client = make_client(
        painter, tmp_path, controlnet_dir=folder, max_controlnets=1, control_cache=1
    )
    good = {"name": "canny-sdxl", "image": picture_b64()}
    assert error_of(generate(client, good, good)) == ("controlnets", "invalid_value")


def test_union_and_other_models_do_not_mix(client: TestClient) -> None:
    units = [
        {"name": "canny-sdxl", "image": picture_b64()},
        {"name": "union", "image": picture_b64(), "mode": "depth"},
    ]
    assert error_of(generate(client, *units)) == ("controlnets[1].name", "invalid_controlnet")


def test_with_hires_each_unit_brings_a_map_fitted_to_each_pass(
    client: TestClient, painter: SeedPainter
) -> None:
    units = [
        {"name": "canny-sdxl", "image": picture_b64()},
        {"name": "depth", "image": picture_b64(), "preprocessor": "canny", "scale": 0.75},
    ]
    response = generate(client, *units, hires={"scale": 2, "upscaler": "lanczos"})
    assert response.status_code == 200, response.text
    image = decode(response.json()["data"][0]["b64_json"])
    assert image.size == (128, 128)  # the final size, not the first pass's
    job = painter.jobs[-1]
    hires = job.params.hires
    assert hires is not None and (hires.first_width, hires.first_height) == (64, 64)
    assert [len(data) for data in job.control_images] == [3 * 128 * 128] * 2
    assert [len(data) for data in job.first_pass_control_images] == [3 * 64 * 64] * 2
    final, first = (
        np.frombuffer(images[0], np.uint8).reshape(side, side, 3)
        for images, side in ((job.control_images, 128), (job.first_pass_control_images, 64))
    )
    # 64x32 covers 64x64 at 2x (128x64), cropped to its centre: the 16x16 square is 32x32 in
    # the middle; at the final size, 64x64 (as without the hires fix).
    assert (first[20:44, 20:44] == 255).all() and (first[:12] == 0).all()
    assert (final[40:88, 40:88] == 255).all() and (final[:24] == 0).all()
    # canny's map is made at each pass's size: one-pixel white edges on black in both.
    edges = np.frombuffer(job.first_pass_control_images[1], np.uint8)
    assert set(np.unique(edges)) == {0, 255}
    assert set(np.unique(np.frombuffer(job.control_images[1], np.uint8))) == {0, 255}
    text = image.text["parameters"]
    # A1111's Size is the first pass's, Pixel Perfect's resolution is computed against it,
    # and the unit says it acts in both passes.
    assert "Size: 64x64" in text and "Hires upscale: 2.0" in text
    assert (
        'ControlNet 1: "Module: canny, Model: depth, Weight: 0.75, Resize Mode: Crop and Resize, '
        "Low Vram: False, Processor Res: 64, Threshold A: 100, Threshold B: 200, "
        "Guidance Start: 0, Guidance End: 1, Pixel Perfect: True, Control Mode: Balanced, "
        'Hr Option: Both"'
    ) in text


def test_without_hires_a_unit_has_no_first_pass_map(
    client: TestClient, painter: SeedPainter
) -> None:
    unit = {"name": "canny-sdxl", "image": picture_b64()}
    assert generate(client, unit).status_code == 200
    assert painter.jobs[-1].first_pass_control_images == ()
    text = decode(generate(client, unit).json()["data"][0]["b64_json"]).text["parameters"]
    assert "Hr Option" not in text


def test_bad_hires_fields_with_units_are_still_a_400_naming_them(client: TestClient) -> None:
    unit = {"name": "canny-sdxl", "image": picture_b64()}
    assert error_of(generate(client, unit, hires={"scale": 9}))[0] == "hires.scale"
    assert error_of(generate(client, {**unit, "name": "absent"}, hires={}))[0] == (
        "controlnets[0].name"
    )


def test_requests_without_controlnets_send_none(client: TestClient, painter: SeedPainter) -> None:
    assert client.post("/images/generations", json={"prompt": "x", "size": SIZE}).status_code == 200
    job = painter.jobs[-1]
    assert (job.params.controlnets, job.control_images) == ((), ())


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("path", ["/images/edits", "/images/variations"])
def test_multipart_requests_take_controlnets_as_a_json_field(
    client: TestClient, painter: SeedPainter, path: str
) -> None:
    units = [{"name": "depth", "image": picture_b64(), "preprocessor": "canny"}]
    data = {"controlnets": json.dumps(units), "size": "256x256"}
    if path.endswith("edits"):
        data["prompt"] = "a fox"
    response = client.post(path, files={"image": ("a.png", png(256, 256))}, data=data)
    assert response.status_code == 200, response.text
    job = painter.jobs[-1]
    assert [unit.name for unit in job.params.controlnets] == ["depth"]
    assert len(job.control_images[0]) == 3 * job.params.width * job.params.height


def test_a_bad_form_field_is_a_400_naming_it(client: TestClient) -> None:
    data = {"controlnets": "[not json", "prompt": "x"}
    response = client.post("/images/edits", files={"image": ("a.png", png(64, 64))}, data=data)
    assert error_of(response)[0] == "controlnets"


def test_image_jobs_take_controlnets(client: TestClient, painter: SeedPainter) -> None:
    assert all("controlnets" in model.model_fields for model in SUBMISSIONS.values())


@pytest.fixture
def upscaling_client(folder: Path, tmp_path: Path) -> tuple[TestClient, DescribingPainter]:
    upscalers = tmp_path / "upscalers"
    upscalers.mkdir()
    (upscalers / "tiny-esrgan.safetensors").write_bytes(b"x")  # the worker's to read
    painter = DescribingPainter()
    return make_client(painter, tmp_path, controlnet_dir=folder, upscaler_dir=upscalers), painter


def test_hires_through_an_upscaler_model_takes_units(
    upscaling_client: tuple[TestClient, DescribingPainter],
) -> None:
    client, painter = upscaling_client
    unit = {"name": "canny-sdxl", "image": picture_b64()}
    response = generate(client, unit, hires={"upscaler": "tiny-esrgan"})
    assert response.status_code == 200, response.text
    job = painter.jobs[-1]
    assert job.params.hires is not None and job.params.hires.upscaler_model == "tiny-esrgan"
    assert [len(data) for data in job.first_pass_control_images] == [3 * 64 * 64]


def noise_png(width: int, height: int) -> tuple[bytes, Image.Image]:
    """A PNG of noise (a map cut or resized wrongly shows) and its picture."""
    picture = Image.fromarray(
        np.random.default_rng(3).integers(0, 256, (height, width, 3), np.uint8), "RGB"
    )
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue(), picture


def upscale(client: TestClient, image: bytes, units: list[dict[str, Any]], **fields: str) -> Any:
    data = {"scale": "2", "controlnets": json.dumps(units), **fields}
    return client.post("/images/upscale", files={"image": ("a.png", image)}, data=data)


def test_an_upscale_through_an_upscaler_model_takes_units(
    upscaling_client: tuple[TestClient, DescribingPainter],
) -> None:
    client, painter = upscaling_client
    units = [{"name": "canny-sdxl", "image": picture_b64(), "scale": 0.6}]
    response = upscale(client, png(64, 48), units, upscaler="tiny-esrgan")
    assert response.status_code == 200, response.text
    assert decode(response.json()["data"][0]["b64_json"]).size == (128, 96)
    job = painter.jobs[-1]
    assert job.params.upscale is not None and job.params.upscale.upscaler == "tiny-esrgan"
    assert [(unit.name, unit.scale) for unit in job.params.controlnets] == [("canny-sdxl", 0.6)]
    # The init image comes at the source's size (the model takes it); the map at the final one.
    assert len(job.init_image or b"") == 3 * 64 * 48
    assert [len(image) for image in job.control_images] == [3 * 128 * 96]


@pytest.mark.parametrize("upscaler", [{"upscaler": "tiny-esrgan"}, {}])
def test_an_upscale_units_image_defaults_to_the_picture_being_upscaled(
    upscaling_client: tuple[TestClient, DescribingPainter], upscaler: dict[str, str]
) -> None:
    client, painter = upscaling_client
    data, picture = noise_png(64, 48)
    units = [{"name": "union", "mode": "tile"}]
    response = upscale(client, data, units, denoising_strength="0.4", **upscaler)
    assert response.status_code == 200, response.text
    job = painter.jobs[-1]
    assert job.params.controlnets[0].mode == 6
    expected = fit_crop_and_resize(picture, 128, 96)
    assert job.control_images[0] == expected.tobytes()


def test_units_with_the_upscaler_model_alone_are_a_400_naming_controlnets(
    upscaling_client: tuple[TestClient, DescribingPainter],
) -> None:
    client, painter = upscaling_client
    units = [{"name": "canny-sdxl"}]
    response = upscale(client, png(64, 48), units, upscaler="tiny-esrgan", denoising_strength="0")
    assert error_of(response) == ("controlnets", "invalid_value")
    assert "denoising_strength 0" in response.json()["error"]["message"]
    assert not painter.jobs


@pytest.mark.parametrize("path", ["/images/edits", "/images/variations"])
def test_elsewhere_a_unit_without_an_image_is_a_400_naming_it(
    client: TestClient, painter: SeedPainter, path: str
) -> None:
    data = {"controlnets": json.dumps([{"name": "depth"}]), "prompt": "a fox"}
    response = client.post(path, files={"image": ("a.png", png(64, 64))}, data=data)
    assert error_of(response) == ("controlnets[0].image", "invalid_value")
    assert error_of(generate(client, {"name": "depth"})) == (
        "controlnets[0].image",
        "invalid_value",
    )
    assert not painter.jobs


def test_an_only_masked_edit_cuts_each_map_from_its_region(
    client: TestClient, painter: SeedPainter
) -> None:
    """The map fitted to the answer's size, its region cut and fitted to the render size, as
    the picture's is (diffusers' ControlNet inpaint pipeline with padding_mask_crop)."""
    from sdxl_service.api.control_maps import fit_crop_and_resize
    from sdxl_service.api.inpaint_options import resize_and_fill

    mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (160, 160, 200, 200))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    units = [{"name": "depth", "image": picture_b64(64, 64)}]
    data = {"prompt": "a fox", "controlnets": json.dumps(units), "inpaint_area": "only_masked"}
    files = {"image": ("a.png", png(256, 256)), "mask": ("mask.png", buffer.getvalue())}
    response = client.post("/images/edits", files=files, data=data)
    assert response.status_code == 200, response.text
    job = painter.jobs[-1]
    width, height = job.params.width, job.params.height
    control = base64.b64decode(picture_b64(64, 64))
    whole = Image.fromarray(fit_crop_and_resize(Image.open(io.BytesIO(control)), 256, 256))
    region = (128, 128, 232, 232)  # the mask's box, 32 pixels around it, within the picture
    assert job.control_images[0] == resize_and_fill(whole.crop(region), width, height).tobytes()
