"""A1111's inpainting options on the HTTP side: diffusers' steps copied exactly, and masked
edits with `mask_blur` and `inpaint_area` through the real routes (a pipeline that paints
seeds): what is rendered, what comes back, the 400s, the infotext."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
from diffusers.image_processor import VaeImageProcessor
from fastapi.testclient import TestClient
from PIL import Image, ImageFilter

from sdxl_service.api import inpaint_options
from sdxl_service.api.app import create_app
from sdxl_service.api.errors import APIError
from sdxl_service.api.files import LocalFileStore
from sdxl_service.api.infotext_reader import parse_infotext
from sdxl_service.api.request_kinds import EDIT
from sdxl_service.api.schemas import ImageEditRequest
from sdxl_service.api.serving import ImagesServing
from sdxl_service.api.uploads import EditSource
from sdxl_service.settings import Settings
from tests.decoded import decode

from .test_serving import SeedPainter, error_of, noise, part

IMAGES = VaeImageProcessor()
MASKS = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def transparent_box(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """An OpenAI mask: the box transparent (repainted), the rest opaque."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


# --- diffusers' steps, copied: the same pixels and regions as diffusers' own ----------------

MASKS_AND_SIZES = [
    ((128, 96), (40, 30, 60, 50), (64, 64), 32),
    ((128, 96), (0, 0, 10, 90), (96, 64), 8),
    ((128, 96), (100, 80, 128, 96), (64, 96), 0),
    ((96, 128), (10, 10, 90, 20), (128, 64), 16),
    ((64, 64), (20, 20, 21, 21), (64, 64), 256),
]


@pytest.mark.parametrize(("size", "box", "render", "pad"), MASKS_AND_SIZES)
def test_the_crop_region_is_diffusers(size, box, render, pad) -> None:
    mask = box_mask(*size, box)
    for blurred in (mask, mask.filter(ImageFilter.GaussianBlur(5))):
        assert inpaint_options.crop_region(blurred, *render, pad) == MASKS.get_crop_region(
            blurred, *render, pad=pad
        )


@pytest.mark.parametrize(("size", "box", "render", "pad"), MASKS_AND_SIZES)
def test_the_fill_and_crop_resizes_are_diffusers(size, box, render, pad) -> None:
    picture = noise(*size)
    region = MASKS.get_crop_region(box_mask(*size, box), *render, pad=pad)
    cropped = picture.crop(region)
    width, height = render
    for ours, theirs in (
        (inpaint_options.resize_and_fill, IMAGES._resize_and_fill),
        (inpaint_options.resize_and_crop, IMAGES._resize_and_crop),
    ):
        assert np.array_equal(
            np.asarray(ours(cropped, width, height)), np.asarray(theirs(cropped, width, height))
        )
        back = ours(picture, region[2] - region[0], region[3] - region[1])
        expected = theirs(picture, region[2] - region[0], region[3] - region[1])
        assert np.array_equal(np.asarray(back), np.asarray(expected))


@pytest.mark.parametrize("blur", [0, 4, 16])
@pytest.mark.parametrize("crop", [None, (16, 8, 80, 56)])
def test_the_overlay_is_diffusers(blur: int, crop) -> None:
    picture, rendered = noise(96, 64, 1), noise(64, 48, 2)
    mask = inpaint_options.blur(box_mask(96, 64, (30, 20, 60, 40)), blur)
    if blur:
        expected_mask = IMAGES.blur(box_mask(96, 64, (30, 20, 60, 40)), blur_factor=blur)
        assert np.array_equal(np.asarray(mask), np.asarray(expected_mask))
    if crop is None:
        rendered = noise(96, 64, 2)
    ours = inpaint_options.apply_overlay(mask, picture, rendered, crop)
    theirs = IMAGES.apply_overlay(mask, picture, rendered, crop)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("blur", [0, 3])
@pytest.mark.parametrize("region", [None, (16, 8, 80, 56), (8, 0, 96, 64)])
def test_pasting_back_is_diffusers_overlay(blur: int, region) -> None:
    """Over the whole picture a two-valued mask takes the plain composite, and a region (which
    holds every masked pixel, as crop_region's does) is blended alone: the same pixels."""
    picture = noise(96, 64, 1)
    rendered = noise(96, 64, 2) if region is None else noise(48, 32, 2)
    mask = inpaint_options.blur(box_mask(96, 64, (30, 20, 61, 41)), blur)
    assert np.array_equal(
        np.asarray(inpaint_options.paste_back(mask, picture, rendered, region)),
        np.asarray(IMAGES.apply_overlay(mask, picture, rendered, region)),
    )


def test_a_blank_mask_has_no_region() -> None:
    assert inpaint_options.only_masked(noise(64, 64), Image.new("L", (64, 64)), 64, 64, 32) is None


# --- the request rules ----------------------------------------------------------------------

SETTINGS = Settings()


def resolved(fields: dict[str, Any], size=(96, 64), box=(40, 20, 56, 36), native=64):
    source = EditSource(noise(*size), box_mask(*size, box))
    return EDIT.resolve(ImageEditRequest(prompt="x", **fields), source, SETTINGS, native)


def test_without_the_options_a_masked_edit_renders_as_before() -> None:
    plain = resolved({})
    assert plain.paste_region is None
    mask = box_mask(96, 64, (40, 20, 56, 36))
    assert plain.job.mask == mask.tobytes()
    assert plain.job.init_image == noise(96, 64).tobytes()
    assert plain.repaint_mask is not None and plain.repaint_mask.tobytes() == mask.tobytes()


def test_only_masked_renders_the_region_fitted_to_the_render_size() -> None:
    only = resolved({"inpaint_area": "only_masked", "inpaint_padding": 4})
    params = only.job.params
    assert (only.width, only.height) == (96, 64) == (params.width, params.height)
    region = MASKS.get_crop_region(box_mask(96, 64, (40, 20, 56, 36)), 96, 64, pad=4)
    assert only.paste_region == region
    picture = IMAGES.resize(noise(96, 64).crop(region), 64, 96, resize_mode="fill")
    assert only.job.init_image == picture.tobytes()
    mask = MASKS.resize(box_mask(96, 64, (40, 20, 56, 36)).crop(region), 64, 96, "fill")
    assert only.job.mask == mask.convert("L").tobytes()


def test_the_default_padding_is_a1111s_32() -> None:
    only = resolved({"inpaint_area": "only_masked"})
    assert only.paste_region == MASKS.get_crop_region(
        box_mask(96, 64, (40, 20, 56, 36)), 96, 64, pad=32
    )


def test_a_blurred_mask_is_rendered_and_composited_blurred() -> None:
    blurred = resolved({"mask_blur": 4})
    expected = IMAGES.blur(box_mask(96, 64, (40, 20, 56, 36)), 4)
    assert blurred.job.mask == expected.tobytes()
    assert blurred.repaint_mask is not None
    assert blurred.repaint_mask.tobytes() == expected.tobytes()
    # Rendered larger (a native size above the answer's): the mask resized as diffusers does.
    large = resolved({"mask_blur": 4}, native=128)
    width, height = large.job.params.width, large.job.params.height
    assert (width, height) != (96, 64)
    assert large.job.mask == expected.resize((width, height), Image.Resampling.LANCZOS).tobytes()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"mask_blur": 4}, "mask_blur"),
        ({"inpaint_area": "whole"}, "inpaint_area"),
        ({"inpaint_area": "only_masked", "inpaint_padding": 8}, "inpaint_area"),
    ],
)
def test_the_options_without_a_mask_are_refused_naming_them(fields, param) -> None:
    req = ImageEditRequest(prompt="x", **fields)
    with pytest.raises(APIError) as caught:
        EDIT.resolve(req, EditSource(noise(64, 64)), SETTINGS, 64)
    assert caught.value.param == param


# --- through the routes ---------------------------------------------------------------------


@pytest.fixture
def painter() -> SeedPainter:
    return SeedPainter()


@pytest.fixture
def client(painter: SeedPainter, tmp_path) -> TestClient:
    settings = Settings(files_dir=tmp_path, max_body_bytes=1_000_000)
    serving = ImagesServing(settings, painter, LocalFileStore(tmp_path, 60))
    return TestClient(create_app(lambda: serving, settings.max_body_bytes))


BOX = (40, 24, 56, 40)


def edit(client: TestClient, size=(96, 64), **fields: Any):
    files = {"image": part(noise(*size)), "mask": part(transparent_box(*size, BOX))}
    data = {"prompt": "a fox", "seed": "3", **{k: str(v) for k, v in fields.items()}}
    return client.post("/images/edits", files=files, data=data)


def test_only_masked_answers_the_pictures_size_with_the_rest_kept(client, painter) -> None:
    response = edit(client, inpaint_area="only_masked", inpaint_padding=8, n=2)
    assert response.status_code == 200, response.text
    job = painter.jobs[-1]
    # The painter renders at its native 128: the region is fitted to that, and scaled back.
    assert job.params.width > 96 and job.params.height > 64
    assert response.json()["size"] == "96x64"
    for seed, item in zip((3, 4), response.json()["data"], strict=True):
        answer = np.asarray(decode(item["b64_json"]))
        assert answer.shape == (64, 96, 3)
        inside = answer[BOX[1] : BOX[3], BOX[0] : BOX[2]]
        assert (inside == (seed, 0, 0)).all()
        outside = np.ones((64, 96), bool)
        outside[BOX[1] : BOX[3], BOX[0] : BOX[2]] = False
        assert np.array_equal(answer[outside], np.asarray(noise(96, 64))[outside])


def test_mask_blur_blends_the_edge(client, painter) -> None:
    response = edit(client, mask_blur=4, response_format="url")
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    answer = np.asarray(decode_url(client, url)).astype(int)
    picture = np.asarray(noise(96, 64)).astype(int)
    painted = np.array([3, 0, 0])
    # Just outside the box: a blend of the two, neither alone.
    edge = answer[32, BOX[2] + 1]
    assert not np.array_equal(edge, picture[32, BOX[2] + 1]) and not np.array_equal(edge, painted)
    assert np.array_equal(answer[0, 0], picture[0, 0])  # far away: the picture


def decode_url(client: TestClient, url: str) -> Image.Image:
    image = Image.open(io.BytesIO(client.get(url.removeprefix("http://testserver")).content))
    image.load()
    return image


def test_the_infotext_says_a1111s_labels_and_reads_back(client) -> None:
    response = edit(client, mask_blur=4, inpaint_area="only_masked", inpaint_padding=24)
    text = decode(response.json()["data"][0]["b64_json"]).text["parameters"]
    read = parse_infotext(text)
    assert (read["Mask blur"], read["Inpaint area"], read["Masked area padding"]) == (
        "4",
        "Only masked",
        "24",
    )
    plain = parse_infotext(decode(edit(client).json()["data"][0]["b64_json"]).text["parameters"])
    assert plain["Mask blur"] == "0" and "Inpaint area" not in plain


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"mask_blur": 65}, "mask_blur"),
        ({"mask_blur": -1}, "mask_blur"),
        ({"mask_blur": "soft"}, "mask_blur"),
        ({"inpaint_area": "center"}, "inpaint_area"),
        ({"inpaint_area": "only_masked", "inpaint_padding": 257}, "inpaint_padding"),
        ({"inpaint_padding": 8}, "inpaint_padding"),
    ],
)
def test_bad_values_are_400s_naming_the_field(client, fields, param) -> None:
    error = error_of(edit(client, **fields))
    assert error["param"] == param


def test_the_options_on_an_edit_without_a_mask_are_a_400(client) -> None:
    response = client.post(
        "/images/edits",
        files={"image": part(noise(64, 64))},
        data={"prompt": "x", "mask_blur": "4"},
    )
    assert error_of(response)["param"] == "mask_blur"


def test_an_outpaint_goes_through_only_masked(client, painter) -> None:
    response = client.post(
        "/images/edits",
        files={"image": part(noise(64, 64))},
        data={
            "prompt": "x",
            "seed": "3",
            "outpaint": '{"right": 32}',
            "inpaint_area": "only_masked",
        },
    )
    assert response.status_code == 200, response.text
    answer = np.asarray(decode(response.json()["data"][0]["b64_json"]))
    assert answer.shape == (64, 96, 3)
    assert (answer[:, 64:] == (3, 0, 0)).all()
    assert np.array_equal(answer[:, :16], np.asarray(noise(64, 64))[:, :16])


def test_a_variation_ignores_them_as_fields_it_does_not_know(client) -> None:
    response = client.post(
        "/images/variations",
        files={"image": part(noise(64, 64))},
        data={"mask_blur": "4", "inpaint_area": "only_masked", "size": "256x256"},
    )
    assert response.status_code == 200, response.text


def test_previews_of_an_only_masked_edit_are_pasted_into_the_picture(client) -> None:
    response = edit(client, inpaint_area="only_masked", stream="true", partial_images=1)
    assert response.status_code == 200, response.text
    events = [
        json.loads(line.removeprefix("data: "))
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]
    preview = next(event for event in events if event["type"] == "image_edit.partial_image")
    answer = np.asarray(decode(preview["b64_json"]))
    assert answer.shape == (64, 96, 3)
    assert (answer[BOX[1] : BOX[3], BOX[0] : BOX[2]] == 10).all()  # the painter's grey
    assert np.array_equal(answer[:8, :8], np.asarray(noise(96, 64))[:8, :8])
