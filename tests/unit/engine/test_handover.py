"""The base/refiner step split, as diffusers runs it on SDXL's schedule, without a UNet."""

from __future__ import annotations

import pytest

from sdxl_service.choices import RefinerMode, RenderKind, SchedulerName
from sdxl_service.contract.render_request import RenderParams
from sdxl_service.engine.components import scheduler_config
from sdxl_service.engine.handover import ensemble_split, refiner_handover, sequential_strength
from tests.jobs import make_params


def test_30_steps_at_0_8_split_23_base_and_7_refiner() -> None:
    # Not 24 + 6: SDXL's Euler schedule ("leading", 33 apart: 958, 925, ..., 1) has
    # 23 timesteps at or above diffusers' cut-off of 1000 * (1 - 0.8) = 200.
    assert ensemble_split(30, 0.8, SchedulerName.EULER, scheduler_config()) == (23, 7)


SECOND_ORDER = {SchedulerName.HEUN, SchedulerName.DPM2, SchedulerName.DPM2_A}


@pytest.mark.parametrize("scheduler", list(SchedulerName))
def test_every_step_goes_to_one_of_the_two(scheduler: SchedulerName) -> None:
    for steps in (10, 25, 30):
        base, refiner = ensemble_split(steps, 0.8, scheduler, scheduler_config())
        assert base > 0 and refiner > 0
        if scheduler in SECOND_ORDER:
            # UNet calls: two a step but the first; diffusers' refiner repeats the base's
            # last call where the cut-off falls between the two of a step.
            assert base + refiner in (2 * steps - 1, 2 * steps)
            assert refiner % 2 == 1
        else:
            assert base + refiner == steps


@pytest.mark.parametrize("schedule_type", ["karras", "exponential", "sgm_uniform"])
def test_the_split_follows_the_schedule_type(schedule_type: str) -> None:
    plain = ensemble_split(10, 0.8, SchedulerName.DPMPP_2M, scheduler_config())
    scheduled = ensemble_split(
        10, 0.8, SchedulerName.DPMPP_2M, scheduler_config(), schedule_type=schedule_type
    )
    assert sum(scheduled) == 10
    assert scheduled != plain or schedule_type == "sgm_uniform"


@pytest.mark.parametrize(
    ("steps", "strength", "expected"),
    [
        # The last 7 of 10 steps; 5 of them above 0.8's cut-off.
        (10, 0.75, (5, 2)),
        # strength 0.21 > 1 - 0.8, yet its first step (t=166) is below the cut-off at t=200.
        (30, 0.21, (0, 6)),
        (10, 0.15, (0, 1)),
    ],
)
def test_an_edit_splits_only_the_steps_it_runs(
    steps: int, strength: float, expected: tuple[int, int]
) -> None:
    split = ensemble_split(steps, 0.8, SchedulerName.EULER, scheduler_config(), strength=strength)
    assert split == expected


def test_sequential_strength_is_diffusers_1_minus_high_noise_frac() -> None:
    # diffusers' refiner recipe: img2img at strength 1 - high_noise_frac.
    assert sequential_strength(30, 0.8) == 1 - 0.8
    assert sequential_strength(10, 0.7) == 1 - 0.7


def test_sequential_refiner_runs_the_steps_diffusers_runs() -> None:
    # diffusers' img2img runs int(steps * strength) steps, float error included:
    # 30 * (1 - 0.8) = 5.999..., so 5 where 6 would be the exact share.
    for steps, frac, refiner_steps in [(30, 0.8, 5), (10, 0.8, 1), (10, 0.7, 3), (25, 0.8, 4)]:
        assert int(steps * sequential_strength(steps, frac)) == refiner_steps
    assert int(10 * sequential_strength(10, 0.01)) == 9


@pytest.mark.parametrize(("steps", "frac"), [(4, 0.8), (2, 0.9), (1, 0.8), (49, 0.99)])
def test_sequential_refiner_runs_one_step_where_diffusers_would_run_none(
    steps: int, frac: float
) -> None:
    # diffusers raises ValueError for an img2img of no step.
    assert int(steps * (1 - frac)) == 0
    strength = sequential_strength(steps, frac)
    assert 0 < strength <= 1
    assert int(steps * strength) == 1


def params(refiner: RefinerMode, **overrides: object) -> RenderParams:
    return make_params(**{"num_inference_steps": 10, "refiner": refiner, **overrides})


def test_refiner_handover_by_mode() -> None:
    assert refiner_handover(params(RefinerMode.NONE), base_runs=True) is None
    ensemble = refiner_handover(params(RefinerMode.ENSEMBLE), base_runs=True)
    assert ensemble == {"denoising_start": 0.8}
    sequential = refiner_handover(params(RefinerMode.SEQUENTIAL), base_runs=True)
    assert sequential == {"strength": 1 - 0.8}


def test_an_edit_refiner_never_renoises_more_than_the_edit() -> None:
    light = params(RefinerMode.SEQUENTIAL, kind=RenderKind.IMAGE_TO_IMAGE, strength=0.15)
    assert refiner_handover(light, base_runs=True) == {"strength": 0.15}
    heavy = params(RefinerMode.SEQUENTIAL, kind=RenderKind.IMAGE_TO_IMAGE, strength=0.75)
    assert refiner_handover(heavy, base_runs=True) == {"strength": 1 - 0.8}
    # With no base step, the refiner makes the whole edit from its strength.
    alone = params(RefinerMode.ENSEMBLE, kind=RenderKind.IMAGE_TO_IMAGE, strength=0.15)
    assert refiner_handover(alone, base_runs=False) == {"strength": 0.15}
