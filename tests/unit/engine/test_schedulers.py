"""Schedulers by name, built from SDXL's own scheduler config."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from sdxl_service.choices import (
    SAMPLERS,
    SCHEDULE_TYPES,
    SchedulerName,
    ScheduleType,
    sampler_names,
    schedule_type_of,
    scheduler_of,
)
from sdxl_service.engine.components import scheduler_config
from sdxl_service.engine.schedulers import SCHEDULERS, make_scheduler, scheduler_options
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
    "dpmpp_2m_sde": DPMSolverMultistepScheduler,
    "dpmpp_2m_sde_karras": DPMSolverMultistepScheduler,
    "dpmpp_sde": DPMSolverSinglestepScheduler,
    "dpmpp_sde_karras": DPMSolverSinglestepScheduler,
    "dpmpp_3m_sde": DPMSolverMultistepScheduler,
    "euler_a_karras": EulerAncestralDiscreteScheduler,  # a subclass: diffusers' has no Karras
    "heun": HeunDiscreteScheduler,
    "lms": LMSDiscreteScheduler,
    "dpm2": KDPM2DiscreteScheduler,
    "dpm2_a": KDPM2AncestralDiscreteScheduler,
}
# diffusers' scheduler overview ("A1111/k-diffusion"): the options of each A1111 sampler.
A1111_OPTIONS = {
    "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False},
    "dpmpp_2m_sde_karras": {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    "dpmpp_sde": {"use_karras_sigmas": False},
    "dpmpp_sde_karras": {"use_karras_sigmas": True},
    "dpmpp_3m_sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    "euler_a_karras": {"use_karras_sigmas": True},
    "heun": {"use_karras_sigmas": False},
    "lms": {"use_karras_sigmas": False},
    "dpm2": {"use_karras_sigmas": False},
    "dpm2_a": {"use_karras_sigmas": False},
}
SECOND_ORDER = {"heun", "dpm2", "dpm2_a"}


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASSES))
def test_each_name_builds_its_scheduler_on_the_models_noise_schedule(name: str) -> None:
    scheduler = make_scheduler(name, scheduler_config())
    if name == "euler_a_karras":
        assert isinstance(scheduler, EXPECTED_CLASSES[name])
    else:
        assert type(scheduler) is EXPECTED_CLASSES[name]
    # SDXL's training schedule survives the change of sampler.
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_start == 0.00085
    assert scheduler.config.beta_end == 0.012
    spacing = "trailing" if name == "euler_trailing" else "leading"
    assert scheduler.config.timestep_spacing == spacing
    assert scheduler.config.steps_offset == 1
    # First order in diffusers' sense but Heun and DPM2 (the ensemble split counts their
    # two UNet calls a step, engine/handover.py).
    assert scheduler.order == (2 if name in SECOND_ORDER else 1)
    for option, value in A1111_OPTIONS.get(name, {}).items():
        assert scheduler.config[option] == value, option


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


def test_every_scheduler_has_automatic1111s_names_and_reads_them_back() -> None:
    assert set(SAMPLERS) == set(SchedulerName)
    for name, (sampler, schedule) in SAMPLERS.items():
        if schedule is None:
            assert scheduler_of(sampler) == name
            assert scheduler_of(sampler.upper()) == name
        else:  # A1111's older combined names: "DPM++ 2M Karras"
            label = sampler_names(name, ScheduleType.AUTOMATIC)[1]
            assert scheduler_of(f"{sampler} {label}") == name
        assert scheduler_of(name.value) == name
    assert scheduler_of("k_lms_fancy") == "k_lms_fancy"  # for the enum to refuse
    assert schedule_type_of("SGM Uniform") == ScheduleType.SGM_UNIFORM
    assert schedule_type_of("Karras") == ScheduleType.KARRAS


@pytest.mark.parametrize(
    ("named", "sampler", "schedule_type"),
    [
        ("dpmpp_2m_karras", "dpmpp_2m", "karras"),
        ("dpmpp_2m_sde_karras", "dpmpp_2m_sde", "karras"),
        ("dpmpp_sde_karras", "dpmpp_sde", "karras"),
        ("euler_a_karras", "euler_a", "karras"),
        ("euler_trailing", "euler", "sgm_uniform"),
    ],
)
def test_a_schedule_type_makes_the_scheduler_that_names_it(
    named: str, sampler: str, schedule_type: str
) -> None:
    """What the infotext writes ("DPM++ 2M", "Karras") builds what was rendered."""
    assert sampler_names(SchedulerName(named), ScheduleType.AUTOMATIC) == sampler_names(
        SchedulerName(sampler), ScheduleType(schedule_type)
    )
    one = make_scheduler(named, scheduler_config())
    other = make_scheduler(sampler, scheduler_config(), schedule_type)
    assert type(one) is type(other)
    for scheduler in (one, other):
        scheduler.set_timesteps(12)
    assert torch.equal(one.timesteps, other.timesteps)
    assert torch.equal(one.sigmas, other.sigmas)


def test_schedule_types_set_diffusers_documented_options() -> None:
    """diffusers' overview, "Noise schedules and schedule types"."""
    assert scheduler_options("dpmpp_2m_sde", "karras")["use_karras_sigmas"] is True
    exponential = scheduler_options("dpmpp_2m_karras", "exponential")
    assert exponential["use_exponential_sigmas"] is True
    assert exponential["timestep_spacing"] == "linspace"
    assert "use_karras_sigmas" not in exponential  # the named scheduler's own gives way
    assert scheduler_options("heun", "sgm_uniform")["timestep_spacing"] == "trailing"
    built = make_scheduler("dpmpp_2m_karras", scheduler_config(), "exponential")
    assert built.config.use_karras_sigmas is False and built.config.use_exponential_sigmas


def test_euler_a_steps_through_diffusers_karras_and_exponential_sigmas() -> None:
    for schedule_type in ("karras", "exponential"):
        ancestral = make_scheduler("euler_a", scheduler_config(), schedule_type)
        euler = make_scheduler("euler", scheduler_config(), schedule_type)
        for scheduler in (ancestral, euler):
            scheduler.set_timesteps(10)
        assert torch.equal(ancestral.sigmas, euler.sigmas)
        assert torch.equal(ancestral.timesteps, euler.timesteps)
    plain = make_scheduler("euler_a", scheduler_config())
    plain.set_timesteps(10)
    assert not torch.equal(plain.sigmas, ancestral.sigmas)


def test_a_schedule_type_the_scheduler_lacks_is_refused() -> None:
    for name in SchedulerName:
        for schedule_type in set(ScheduleType) - {ScheduleType.AUTOMATIC}:
            if schedule_type in SCHEDULE_TYPES[name]:
                make_scheduler(name, scheduler_config(), schedule_type)
            else:
                with pytest.raises(ValueError, match=schedule_type.value):
                    make_scheduler(name, scheduler_config(), schedule_type)
