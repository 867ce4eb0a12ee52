"""Schedulers by name, built from SDXL's own scheduler config."""

from __future__ import annotations

import diffusers
import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from sdxl_service.choices import SchedulerName
from sdxl_service.engine.components import scheduler_config
from sdxl_service.engine.schedulers import SCHEDULERS, make_scheduler
from sdxl_service.settings import Settings

EXPECTED_CLASSES = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "dpmpp_2m_karras": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler_trailing": EulerDiscreteScheduler,
    "lcm": LCMScheduler,
    "tcd": TCDScheduler,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_each_name_builds_its_scheduler_on_the_models_noise_schedule(name: str) -> None:
    scheduler = make_scheduler(name, scheduler_config())
    assert type(scheduler) is EXPECTED_CLASSES[name]
    # SDXL's training schedule survives the change of sampler.
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_start == 0.00085
    assert scheduler.config.beta_end == 0.012
    spacing = "trailing" if name == "euler_trailing" else "leading"
    assert scheduler.config.timestep_spacing == spacing
    assert scheduler.config.steps_offset == 1
    # First order in diffusers' sense: the ensemble split needs no step fix-up.
    assert scheduler.order == 1


def test_dpmpp_variants_differ_only_in_karras_sigmas() -> None:
    plain = make_scheduler("dpmpp_2m", scheduler_config())
    karras = make_scheduler("dpmpp_2m_karras", scheduler_config())
    for scheduler in (plain, karras):
        assert scheduler.config.algorithm_type == "dpmsolver++"
        assert scheduler.config.solver_order == 2
    assert plain.config.use_karras_sigmas is False
    assert karras.config.use_karras_sigmas is True
    plain.set_timesteps(10)
    karras.set_timesteps(10)
    assert plain.sigmas.tolist() != karras.sigmas.tolist()


def test_trailing_spacing_starts_a_few_step_run_at_the_noisiest_timestep() -> None:
    leading = make_scheduler("euler", scheduler_config())
    trailing = make_scheduler("euler_trailing", scheduler_config())
    for scheduler in (leading, trailing):
        scheduler.set_timesteps(4)
    assert trailing.timesteps.tolist() == [999, 749, 499, 249]  # SDXL-Lightning's four
    assert leading.timesteps[0] < 999


def test_every_call_gets_a_fresh_scheduler() -> None:
    first = make_scheduler("euler", scheduler_config())
    first.set_timesteps(5)
    second = make_scheduler("euler", scheduler_config())
    assert first is not second
    assert second.num_inference_steps is None


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as raised:
        make_scheduler("k_lms_fancy", scheduler_config())
    message = str(raised.value)
    assert "k_lms_fancy" in message
    for name in SCHEDULERS:
        assert name in message


def test_every_choice_has_a_recipe_of_a_diffusers_scheduler() -> None:
    assert set(SCHEDULERS) == set(SchedulerName)
    for name, recipe in SCHEDULERS.items():
        scheduler_class = getattr(diffusers, recipe.class_name, None)
        assert scheduler_class is not None, name
        assert issubclass(scheduler_class, diffusers.SchedulerMixin), name


def test_default_setting_builds_sdxls_own_euler() -> None:
    # The field's default, not Settings(): SDXL_SCHEDULER in the environment must not count.
    default = Settings.model_fields["scheduler"].default
    assert type(make_scheduler(default, scheduler_config())) is EulerDiscreteScheduler
