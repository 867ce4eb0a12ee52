"""The request rules, as pure functions of the request, the settings and the native size."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from sdxl_service.api.errors import APIError
from sdxl_service.api.request_kinds import EDIT, GENERATION, UPSCALE, VARIATION
from sdxl_service.api.request_rules import (
    EDIT_STRENGTH,
    INPAINT_STRENGTH,
    QUALITY_STEPS,
)
from sdxl_service.api.schemas import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImageUpscaleRequest,
    ImageVariationRequest,
)
from sdxl_service.api.uploads import EditSource
from sdxl_service.choices import RefinerMode, RenderKind, SchedulerName
from sdxl_service.settings import Settings

NATIVE = 1024
SETTINGS = Settings(refiner="sequential", scheduler="dpmpp_2m", steps=25, request_timeout=60)


def generation(**fields: object) -> ImageGenerationRequest:
    return ImageGenerationRequest.model_validate({"prompt": "a fox", **fields})


def refused(call, *args) -> APIError:
    with pytest.raises(APIError) as caught:
        call(*args)
    return caught.value


def test_defaults_come_from_the_settings() -> None:
    before = time.time()
    resolved = GENERATION.resolve(generation(), None, SETTINGS, NATIVE)
    params = resolved.job.params
    assert (params.refiner, params.scheduler, params.num_inference_steps) == (
        RefinerMode.SEQUENTIAL,
        SchedulerName.DPMPP_2M,
        SETTINGS.steps,  # quality auto: SDXL_STEPS
    )
    assert (resolved.width, resolved.height, resolved.response_format) == (1024, 1024, "b64_json")
    assert resolved.job.deadline is not None
    assert before + 60 <= resolved.job.deadline <= time.time() + 60


def test_quality_picks_the_step_count() -> None:
    params = GENERATION.resolve(generation(quality="hd"), None, SETTINGS, NATIVE).job.params
    assert params.num_inference_steps == QUALITY_STEPS["hd"]


def test_request_values_override_settings() -> None:
    req = generation(refiner="none", scheduler="ddim", num_inference_steps=9, guidance_scale=0)
    params = GENERATION.resolve(req, None, SETTINGS, NATIVE).job.params
    assert (
        params.refiner,
        params.scheduler,
        params.num_inference_steps,
        params.guidance_scale,
    ) == (
        RefinerMode.NONE,
        SchedulerName.DDIM,
        9,
        0.0,
    )


def test_n_images_get_consecutive_seeds() -> None:
    job = GENERATION.resolve(generation(n=3, seed=41), None, SETTINGS, NATIVE).job
    assert job.seeds == [41, 42, 43]


def test_small_sizes_render_at_native_scale() -> None:
    resolved = GENERATION.resolve(generation(size="256x128"), None, SETTINGS, NATIVE)
    assert (resolved.width, resolved.height) == (256, 128)
    assert abs(resolved.job.params.width / resolved.job.params.height - 2) < 0.02
    assert resolved.job.params.width * resolved.job.params.height >= 0.9 * NATIVE**2


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 11}, "n"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({"size": "1004x1000"}, "size"),  # not multiples of 8
        ({"size": "4096x4096"}, "size"),
        ({"width": 512}, "height"),
        ({"background": "transparent"}, "background"),
        ({"stream": True, "response_format": "url"}, "response_format"),
        ({"output_compression": 50}, "output_compression"),
    ],
)
def test_bad_generations_name_the_parameter(fields: dict[str, object], param: str) -> None:
    error = refused(GENERATION.resolve, generation(**fields), None, SETTINGS, NATIVE)
    assert (error.status, error.param) == (400, param)


def test_an_unknown_model_is_404() -> None:
    error = refused(GENERATION.resolve, generation(model="sd-1.5"), None, SETTINGS, NATIVE)
    assert (error.status, error.code) == (404, "model_not_found")


def picture(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (10, 20, 30))


def test_an_edit_is_img2img_at_the_pictures_size() -> None:
    req = ImageEditRequest(prompt="x")
    resolved = EDIT.resolve(req, EditSource(picture(96, 64)), SETTINGS, NATIVE)
    params = resolved.job.params
    assert (resolved.width, resolved.height) == (96, 64)
    assert (params.kind, params.strength) == (RenderKind.IMAGE_TO_IMAGE, EDIT_STRENGTH)
    assert len(resolved.job.init_image or b"") == 3 * params.width * params.height


def test_an_edit_with_a_mask_inpaints_and_keeps_the_picture_for_compositing() -> None:
    mask = Image.new("L", (64, 64), 255)
    resolved = EDIT.resolve(
        ImageEditRequest(prompt="x"), EditSource(picture(64, 64), mask), SETTINGS, NATIVE
    )
    assert (resolved.job.params.kind, resolved.job.params.strength) == (
        RenderKind.INPAINT,
        INPAINT_STRENGTH,
    )
    assert resolved.kept_picture is not None and resolved.kept_picture.size == (64, 64)
    assert resolved.repaint_mask is not None and resolved.repaint_mask.size == (64, 64)


def test_an_edit_that_runs_no_step_is_refused() -> None:
    req = ImageEditRequest(prompt="x", strength=0.01)
    error = refused(EDIT.resolve, req, EditSource(picture(64, 64)), SETTINGS, NATIVE)
    assert error.param == "strength"


def test_variations_take_square_pictures_in_openai_sizes() -> None:
    resolved = VARIATION.resolve(
        ImageVariationRequest(), EditSource(picture(64, 64)), SETTINGS, NATIVE
    )
    assert (resolved.width, resolved.height, resolved.job.prompt) == (1024, 1024, "")
    not_square = refused(
        VARIATION.resolve, ImageVariationRequest(), EditSource(picture(64, 32)), SETTINGS, NATIVE
    )
    assert not_square.param == "image"
    odd_size = refused(
        VARIATION.resolve,
        ImageVariationRequest(size="640x640"),
        EditSource(picture(64, 64)),
        SETTINGS,
        NATIVE,
    )
    assert odd_size.param == "size"


def test_no_size_asked_fits_the_servers_bounds() -> None:
    small = Settings(max_side=128, max_pixels=128 * 128)
    for req in (generation(), generation(size="auto")):
        resolved = GENERATION.resolve(req, None, small, NATIVE)
        assert (resolved.width, resolved.height) == (128, 128)


def test_the_hires_fix_renders_the_size_divided_by_its_scale_first() -> None:
    req = generation(size="1536x1024", hires={"scale": 1.5, "upscaler": "lanczos"})
    resolved = GENERATION.resolve(req, None, SETTINGS, NATIVE)
    params = resolved.job.params
    assert (params.width, params.height, resolved.width, resolved.height) == (1536, 1024) * 2
    assert params.hires is not None
    assert (params.hires.first_width, params.hires.first_height) == (
        1024,
        680,
    )  # 682.7 to the nearest multiple of 8
    # AUTOMATIC1111's defaults: the request's steps again, denoising strength 0.7.
    assert (params.hires.steps, params.hires.denoising_strength) == (SETTINGS.steps, 0.7)
    assert params.hires.upscaler == "lanczos"


def test_without_hires_there_is_one_pass() -> None:
    assert GENERATION.resolve(generation(), None, SETTINGS, NATIVE).job.params.hires is None


@pytest.mark.parametrize(
    ("hires", "param"),
    [
        ({"scale": 2.5}, "hires.scale"),
        ({"scale": 0.5}, "hires.scale"),
        ({"denoising_strength": 0}, "hires.denoising_strength"),
        ({"upscaler": ""}, "hires.upscaler"),
        ({"steps": 0}, "hires.steps"),
    ],
)
def test_a_hires_value_out_of_bounds_names_its_field(hires: dict[str, object], param: str) -> None:
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    from sdxl_service.api.errors import validation_error

    with pytest.raises(ValidationError) as caught:
        generation(hires=hires)
    error = validation_error(RequestValidationError(caught.value.errors()))
    assert (error.status, error.param) == (400, param)


def test_a_hires_first_pass_under_the_smallest_side_is_refused() -> None:
    settings = Settings(min_side=256, render_native=False)
    error = refused(
        GENERATION.resolve, generation(size="384x384", hires={"scale": 2}), None, settings, NATIVE
    )
    assert (error.status, error.param) == (400, "hires.scale")
    assert "192x192" in error.message


def test_a_hires_pass_that_runs_no_step_is_refused() -> None:
    req = generation(hires={"steps": 1, "denoising_strength": 0.5})
    error = refused(GENERATION.resolve, req, None, SETTINGS, NATIVE)
    assert (error.status, error.param) == (400, "hires.denoising_strength")


def upscale_of(picture_size: tuple[int, int], **fields: object):
    source = EditSource(image=Image.new("RGB", picture_size, "white"), mask=None)
    return UPSCALE.resolve(ImageUpscaleRequest.model_validate(fields), source, SETTINGS, NATIVE)


def test_an_upscale_is_an_edit_at_scale_times_the_pictures_size() -> None:
    resolved = upscale_of((800, 600), scale=1.5)
    params = resolved.job.params
    assert (resolved.width, resolved.height) == (1200, 896)  # 900: a tie, to the even multiple of 8
    assert (params.kind, params.strength, resolved.job.prompt) == (
        RenderKind.IMAGE_TO_IMAGE,
        0.3,
        "",
    )
    assert resolved.job.init_image is not None


@pytest.mark.parametrize(
    ("size", "fields", "param"),
    [
        ((1024, 1024), {"scale": 2}, "scale"),  # 2048x2048: over SDXL_MAX_PIXELS
        ((512, 512), {"size": "1024x1024"}, "size"),
        ((512, 512), {"width": 1024, "height": 1024}, "width"),
        ((512, 512), {"denoising_strength": 0.01}, "denoising_strength"),
        ((512, 512), {"stream": True}, "stream"),
    ],
)
def test_a_bad_upscale_names_the_parameter(
    size: tuple[int, int], fields: dict[str, object], param: str
) -> None:
    with pytest.raises(APIError) as caught:
        upscale_of(size, **fields)
    assert (caught.value.status, caught.value.param) == (400, param)
