"""GenerationJob: what crosses from the HTTP service to the pipeline service."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sdxl_service.jobs import GenerationJob, ImageTask, RefinerMode, RenderKind


def job(**overrides: object) -> GenerationJob:
    values: dict[str, object] = {
        "request_id": "r1",
        "prompt": "a fox",
        "seeds": [4, 5],
        "width": 16,
        "height": 8,
        "steps": 10,
        "guidance_scale": 5.0,
        "high_noise_frac": 0.8,
        "refiner": RefinerMode.ENSEMBLE,
        "scheduler": "euler",
    }
    values.update(overrides)
    return GenerationJob(**values)


def inpaint_job() -> GenerationJob:
    return job(
        kind=RenderKind.INPAINT,
        strength=0.5,
        init_image=bytes(range(256)) + bytes(128),  # 16 x 8 RGB
        mask=bytes([255]) * 64 + bytes(64),
    )


def test_an_edit_job_survives_the_json_trip_between_the_services() -> None:
    edit = inpaint_job()
    wire = edit.model_dump_json()
    assert GenerationJob.model_validate_json(wire) == edit
    assert len(wire) < 2 * (len(edit.init_image) + len(edit.mask)) + 1000  # base64, not lists


def test_edits_with_the_same_settings_share_render_params_but_keep_their_pictures() -> None:
    one, other = inpaint_job(), inpaint_job().model_copy(update={"request_id": "r2"})
    assert one.params == other.params
    assert one.params != job().params
    assert one.params != one.model_copy(update={"strength": 0.6}).params
    tasks = one.tasks()
    assert [task.seed for task in tasks] == [4, 5]
    assert all(task.init_image is one.init_image and task.mask is one.mask for task in tasks)


def test_pictures_stay_out_of_reprs() -> None:
    edit = inpaint_job()
    assert "init_image" not in repr(edit)
    assert "\\x" not in repr(edit.tasks()[0])
    assert repr(ImageTask("x", "", 1)) == "ImageTask(prompt='x', negative_prompt='', seed=1)"


@pytest.mark.parametrize(
    "overrides",
    [
        {"kind": RenderKind.IMAGE_TO_IMAGE},  # no picture
        {"init_image": bytes(16 * 8 * 3)},  # a picture for text-to-image
        {"kind": RenderKind.IMAGE_TO_IMAGE, "init_image": bytes(10)},  # wrong size
        {"kind": RenderKind.INPAINT, "init_image": bytes(16 * 8 * 3)},  # no mask
        {"kind": RenderKind.INPAINT, "init_image": bytes(16 * 8 * 3), "mask": bytes(3)},
        {"kind": RenderKind.IMAGE_TO_IMAGE, "init_image": bytes(16 * 8 * 3), "strength": 0},
    ],
)
def test_inconsistent_jobs_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        job(**overrides)
