"""Noise schedulers by the names the API accepts.

Each name is a diffusers scheduler class plus the settings that make it the
sampler people know by that name; it is built from a model's own scheduler
config so the training noise schedule (betas, spacing, offset) is kept.

AUTOMATIC1111's samplers and schedule types are mapped as diffusers' own scheduler
docs map them ("A1111/k-diffusion" and "Noise schedules and schedule types",
https://huggingface.co/docs/diffusers/api/schedulers/overview): "DPM++ 2M SDE" is
DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "DPM++ SDE" is
DPMSolverSinglestepScheduler, "DPM2 a" KDPM2AncestralDiscreteScheduler, Karras is
use_karras_sigmas=True, Exponential timestep_spacing="linspace" with
use_exponential_sigmas=True, SGM Uniform timestep_spacing="trailing". "DPM++ 3M SDE",
which the table leaves out, is the 2M SDE row at solver_order=3.

Most are first-order in diffusers' sense (`scheduler.order == 1`), so splitting the
timesteps at `denoising_end`/`denoising_start` hands the refiner exactly the steps the
base skipped. The multistep solvers restart at the split with a first-order step,
because the refiner's scheduler has no history of the base's model outputs; that is
diffusers' documented behaviour for the ensemble. Heun, DPM2 and DPM2 a are second
order (two UNet calls a step): diffusers' refiner then takes over from the middle of
the base's last step, as its img2img `get_timesteps` does for them.

The stochastic ones (the SDE solvers, the ancestral samplers) draw their noise from the
pipeline's `generator`, one per image, so a seed gives the same image alone or in a batch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..choices import SCHEDULE_TYPES, SchedulerName, ScheduleType


@dataclass(frozen=True)
class SchedulerRecipe:
    class_name: str  # attribute of the `diffusers` package
    overrides: Mapping[str, Any] = field(default_factory=dict)


SCHEDULERS: dict[SchedulerName, SchedulerRecipe] = {
    # SDXL 1.0's own scheduler.
    SchedulerName.EULER: SchedulerRecipe("EulerDiscreteScheduler"),
    SchedulerName.EULER_A: SchedulerRecipe("EulerAncestralDiscreteScheduler"),
    SchedulerName.DPMPP_2M: SchedulerRecipe(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    SchedulerName.DPMPP_2M_KARRAS: SchedulerRecipe(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    SchedulerName.DDIM: SchedulerRecipe("DDIMScheduler"),
    SchedulerName.UNIPC: SchedulerRecipe("UniPCMultistepScheduler"),
    # As SDXL-Lightning's and Hyper-SD's model cards set it up: the last timestep is the
    # noisiest (SDXL's own "leading" spacing starts a 4-step run well below it).
    SchedulerName.EULER_TRAILING: SchedulerRecipe(
        "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}
    ),
    SchedulerName.LCM: SchedulerRecipe("LCMScheduler"),
    SchedulerName.TCD: SchedulerRecipe("TCDScheduler"),
    # AUTOMATIC1111's samplers, as diffusers' scheduler overview maps them (module docstring).
    SchedulerName.DPMPP_2M_SDE: SchedulerRecipe(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    SchedulerName.DPMPP_2M_SDE_KARRAS: SchedulerRecipe(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    SchedulerName.DPMPP_SDE: SchedulerRecipe(
        "DPMSolverSinglestepScheduler", {"use_karras_sigmas": False}
    ),
    SchedulerName.DPMPP_SDE_KARRAS: SchedulerRecipe(
        "DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}
    ),
    SchedulerName.DPMPP_3M_SDE: SchedulerRecipe(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": False},
    ),
    # diffusers' EulerAncestralDiscreteScheduler has no sigma options: Karras (and
    # Exponential) are given to it by `_with_sigma_schedule`.
    SchedulerName.EULER_A_KARRAS: SchedulerRecipe(
        "EulerAncestralDiscreteScheduler", {"use_karras_sigmas": True}
    ),
    SchedulerName.HEUN: SchedulerRecipe("HeunDiscreteScheduler"),
    SchedulerName.LMS: SchedulerRecipe("LMSDiscreteScheduler"),
    SchedulerName.DPM2: SchedulerRecipe("KDPM2DiscreteScheduler"),
    SchedulerName.DPM2_A: SchedulerRecipe("KDPM2AncestralDiscreteScheduler"),
}

_SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# diffusers' "Noise schedules and schedule types" table: the options of each schedule type
# (and none of the other sigma options, which diffusers refuses together).
SCHEDULE_OPTIONS: dict[ScheduleType, dict[str, Any]] = {
    ScheduleType.KARRAS: {"use_karras_sigmas": True},
    ScheduleType.EXPONENTIAL: {"timestep_spacing": "linspace", "use_exponential_sigmas": True},
    ScheduleType.SGM_UNIFORM: {"timestep_spacing": "trailing"},
}


def scheduler_options(name: str, schedule_type: str = ScheduleType.AUTOMATIC) -> dict[str, Any]:
    """The options a scheduler `name` is built with, stepping through `schedule_type`
    (automatic: the scheduler's own schedule)."""
    scheduler, schedule = SchedulerName(name), ScheduleType(schedule_type)
    options = dict(SCHEDULERS[scheduler].overrides)
    if schedule is ScheduleType.AUTOMATIC:
        return options
    if schedule not in SCHEDULE_TYPES[scheduler]:
        raise ValueError(f"scheduler {scheduler.value} has no {schedule.value} schedule")
    # The schedule type replaces the scheduler's own (dpmpp_2m_karras stepping exponentially).
    for option in (*_SIGMA_OPTIONS, "timestep_spacing"):
        options.pop(option, None)
    return options | SCHEDULE_OPTIONS[schedule]


def make_scheduler(
    name: str, config: Mapping[str, Any], schedule_type: str = ScheduleType.AUTOMATIC
) -> Any:
    """A fresh scheduler `name` built from a model's scheduler `config`, stepping through
    `schedule_type` (AUTOMATIC1111's "Schedule type"; automatic: the scheduler's own).

    Fresh on every call because schedulers carry per-run state (step index,
    solver history); sharing one between calls would leak it.
    """
    try:
        recipe = SCHEDULERS[SchedulerName(name)]
    except ValueError:
        names = ", ".join(SchedulerName)
        raise ValueError(f"unknown scheduler {name!r}; valid names: {names}") from None
    options = scheduler_options(name, schedule_type)
    config = dict(config)
    if schedule_type != ScheduleType.AUTOMATIC:
        # The model's own sigma options give way to the schedule asked for.
        for option in _SIGMA_OPTIONS:
            config.pop(option, None)

    import diffusers

    scheduler_class = getattr(diffusers, recipe.class_name)
    sigma_schedule = {key: options.pop(key) for key in _SIGMA_OPTIONS if key in options}
    if scheduler_class is diffusers.EulerAncestralDiscreteScheduler and any(
        sigma_schedule.values()
    ):
        scheduler = _euler_ancestral_with_sigma_schedule().from_config(config, **options)
        scheduler.register_to_config(**sigma_schedule)
        return scheduler
    return scheduler_class.from_config(config, **options, **sigma_schedule)


@functools.cache
def _euler_ancestral_with_sigma_schedule() -> Any:
    import diffusers

    ancestral: Any = diffusers.EulerAncestralDiscreteScheduler

    class EulerAncestralWithSigmaSchedule(ancestral):
        """diffusers' Euler a, which has no sigma options, stepping through the timesteps
        and sigmas diffusers' EulerDiscreteScheduler makes of the same config and options
        (its `use_karras_sigmas`, `use_exponential_sigmas`, registered in this config)."""

        def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
            super().set_timesteps(num_inference_steps, device)
            euler = diffusers.EulerDiscreteScheduler.from_config(self.config)
            euler.set_timesteps(num_inference_steps, device)
            self.timesteps, self.sigmas = euler.timesteps, euler.sigmas

    return EulerAncestralWithSigmaSchedule
