"""RenderRequest: what crosses from the HTTP service to the render service."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sdxl_service.choices import HiresUpscaler, RenderKind, SchedulerName
from sdxl_service.contract.render_request import (
    ControlNetParams,
    HiresParams,
    RenderParams,
    RenderRequest,
)
from sdxl_service.engine.render_batch import ImageTask, image_tasks
from tests.jobs import make_params


def params(**overrides: object) -> RenderParams:
    return make_params(**{"width": 16, "height": 8, "num_inference_steps": 10, **overrides})


def job(render_params: RenderParams | None = None, **overrides: object) -> RenderRequest:
    values: dict[str, object] = {
        "request_id": "r1",
        "params": render_params if render_params is not None else params(),
        "prompt": "a fox",
        "seeds": [4, 5],
    }
    values.update(overrides)
    return RenderRequest.model_validate(values)


INIT_IMAGE = bytes(range(256)) + bytes(128)  # 16 x 8 RGB
MASK = bytes([255]) * 64 + bytes(64)  # 16 x 8 L


def inpaint_job(**param_overrides: object) -> RenderRequest:
    return job(
        params(**{"kind": RenderKind.INPAINT, "strength": 0.5, **param_overrides}),
        init_image=INIT_IMAGE,
        mask=MASK,
    )


def test_a_job_survives_the_json_trip_between_the_services() -> None:
    original = job(params(scheduler=SchedulerName.DPMPP_2M_KARRAS), deadline=1_700_000_000.5)
    copy = RenderRequest.model_validate_json(original.model_dump_json())
    assert copy == original
    assert isinstance(copy.params, RenderParams)
    assert copy.params.scheduler is SchedulerName.DPMPP_2M_KARRAS


def test_an_edit_job_survives_the_json_trip_between_the_services() -> None:
    edit = inpaint_job()
    wire = edit.model_dump_json()
    assert RenderRequest.model_validate_json(wire) == edit
    assert edit.init_image is not None and edit.mask is not None
    assert len(wire) < 2 * (len(edit.init_image) + len(edit.mask)) + 1000  # base64, not lists


def test_render_params_are_hashable_and_equal_for_equal_values() -> None:
    one, same = params(), params()
    assert one == same and hash(one) == hash(same)
    assert len({one, same, params(num_inference_steps=11)}) == 2
    with pytest.raises(ValidationError):
        one.num_inference_steps = 11  # type: ignore[misc]


def test_edits_with_the_same_settings_share_render_params_but_keep_their_pictures() -> None:
    one, other = inpaint_job(), inpaint_job().model_copy(update={"request_id": "r2"})
    assert one.params == other.params
    assert one.params != job().params
    assert one.params != inpaint_job(strength=0.6).params
    tasks = image_tasks(one)
    assert [task.seed for task in tasks] == [4, 5]
    assert all(task.init_image is one.init_image and task.mask is one.mask for task in tasks)


def test_pictures_stay_out_of_reprs() -> None:
    edit = inpaint_job()
    assert "init_image" not in repr(edit)
    assert "\\x" not in repr(image_tasks(edit)[0])
    task = ImageTask(prompt="x", negative_prompt="", seed=1)
    assert repr(task) == "ImageTask(prompt='x', negative_prompt='', seed=1)"


@pytest.mark.parametrize(
    ("param_overrides", "job_overrides"),
    [
        ({"kind": RenderKind.IMAGE_TO_IMAGE}, {}),  # no picture
        ({}, {"init_image": bytes(16 * 8 * 3)}),  # a picture for text-to-image
        ({"kind": RenderKind.IMAGE_TO_IMAGE}, {"init_image": bytes(10)}),  # wrong size
        ({"kind": RenderKind.INPAINT}, {"init_image": bytes(16 * 8 * 3)}),  # no mask
        ({"kind": RenderKind.INPAINT}, {"init_image": bytes(16 * 8 * 3), "mask": bytes(3)}),
        # RenderParams itself refuses an edit that changes nothing.
        ({"kind": RenderKind.IMAGE_TO_IMAGE, "strength": 0}, {"init_image": bytes(16 * 8 * 3)}),
    ],
)
def test_inconsistent_jobs_are_refused(
    param_overrides: dict[str, object], job_overrides: dict[str, object]
) -> None:
    with pytest.raises(ValidationError):
        job(params(**param_overrides), **job_overrides)


def controlled_hires_job(**overrides: object) -> RenderRequest:
    hires = HiresParams(
        first_width=8,
        first_height=8,
        scale=2.0,
        steps=4,
        denoising_strength=0.5,
        upscaler=HiresUpscaler.LANCZOS,
    )
    return job(
        params(hires=hires, controlnets=(ControlNetParams(name="edges"),)),
        **{
            "control_images": (bytes(16 * 8 * 3),),
            "first_pass_control_images": (bytes(8 * 8 * 3),),
            **overrides,
        },
    )


def test_a_hires_job_with_units_carries_each_map_at_both_sizes_to_its_tasks() -> None:
    request = RenderRequest.model_validate_json(controlled_hires_job().model_dump_json())
    tasks = image_tasks(request)
    assert [len(task.control_images[0]) for task in tasks] == [16 * 8 * 3] * 2
    assert [len(task.first_pass_control_images[0]) for task in tasks] == [8 * 8 * 3] * 2


@pytest.mark.parametrize(
    "overrides",
    [
        {"first_pass_control_images": ()},  # the first pass's map missing
        {"first_pass_control_images": (bytes(16 * 8 * 3),)},  # at the final size
        {"control_images": (bytes(8 * 8 * 3),)},  # the second pass's at the first size
    ],
)
def test_a_hires_job_with_a_map_missing_or_at_the_wrong_size_is_refused(
    overrides: dict[str, object],
) -> None:
    with pytest.raises(ValidationError):
        controlled_hires_job(**overrides)


def test_first_pass_maps_without_the_hires_fix_are_refused() -> None:
    with pytest.raises(ValidationError, match="first pass"):
        job(
            params(controlnets=(ControlNetParams(name="edges"),)),
            control_images=(bytes(16 * 8 * 3),),
            first_pass_control_images=(bytes(16 * 8 * 3),),
        )
