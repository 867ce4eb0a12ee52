"""Live previews: the predicted clean latents at evenly spaced steps, decoded for whoever asked.

A preview shows the current estimate of the final picture: the clean latents
(x0) the scheduler predicts at a step, not the noisy latents it steps through.
They are taken by wrapping the `step` of each stage's fresh scheduler for one
pipeline call, so a render without previews runs no wrapper at all.

Three decoders (SDXL_PREVIEW_DECODER): `approx`, a fixed linear map;
`vae`, the engine's own VAE; `taesd`, the tiny autoencoder of
SDXL_PREVIEW_MODEL (madebyollin/taesdxl), loaded once per engine: at startup
by `Engine.load` when it is the configured decoder, so that no request waits
on its download, otherwise on the first render that asks for it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from ..choices import Preset, PreviewDecoder, RefinerMode
from ..contract.render_request import RenderParams
from .config import EngineConfig
from .handover import ensemble_split, refiner_handover
from .latents import LatentCodec
from .loading import load_preview_model
from .render_batch import RenderBatch
from .schedulers import make_scheduler

MAX_PREVIEWS = 3

PreviewCallback = Callable[[int, int, Image.Image], None]
# UNet latents (a batch) -> one RGB image per latent, at the render size.
LatentDecoder = Callable[[torch.Tensor], list[Image.Image]]
# step number (1-based, over base and refiner) -> [(task index, preview index)]
PreviewSchedule = dict[int, list[tuple[int, int]]]

# ComfyUI's SDXL latent-to-RGB factors and bias (comfy/latent_formats.py,
# class SDXL; also its live-preview "latent2rgb" method): a linear fit from the
# UNet-scaled latents (x 0.13025) to the VAE's RGB in [-1, 1].
SDXL_LATENT_RGB_FACTORS = (
    #   R        G        B
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


# --- x0 capture ---------------------------------------------------------------


def predicted_clean_latents(scheduler: Any, output: Any) -> torch.Tensor:
    """The clean latents (x0) a scheduler predicted in the `step` that returned `output`."""
    if hasattr(scheduler, "model_outputs"):
        # DPM-Solver++ and UniPC: step() stores convert_model_output(model_output,
        # sample) -- the data prediction for these configurations -- as
        # model_outputs[-1]. Read there, it costs nothing and touches no state;
        # calling convert_model_output before the first step() would fail, as
        # step_index is only set by step().
        algorithm = scheduler.config.get("algorithm_type", "dpmsolver++")
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++") or not getattr(
            scheduler, "predict_x0", True
        ):
            raise ValueError(f"{type(scheduler).__name__} does not predict x0 here")
        latents: torch.Tensor = scheduler.model_outputs[-1]
        return latents
    # Euler, Euler ancestral, DDIM: (prev_sample, pred_original_sample) with
    # return_dict=False, as the pipelines call it.
    if isinstance(output, tuple):
        latents = output[1]
        return latents
    latents = output.pred_original_sample
    return latents


def capture_clean_latents(scheduler: Any, observe: Callable[[torch.Tensor], None]) -> None:
    """Calls `observe(x0)` after every step of this scheduler instance.

    Wraps the instance's `step`, so the scheduler must be a fresh one for one
    pipeline call (the engine makes one per stage and render).
    """
    step = scheduler.step

    # wraps: the pipelines pass `generator` and `eta` only to a step whose
    # signature names them (prepare_extra_step_kwargs); without it Euler
    # ancestral would draw its noise from the global RNG.
    @functools.wraps(step)
    def step_and_observe(*args: Any, **kwargs: Any) -> Any:
        output = step(*args, **kwargs)
        observe(predicted_clean_latents(scheduler, output))
        return output

    scheduler.step = step_and_observe


# --- decoders -----------------------------------------------------------------


def approx_decoder(width: int, height: int) -> LatentDecoder:
    """Latents -> RGB by SDXL's fixed linear map: no weights, blurry, nearly free."""

    def decode(latents: torch.Tensor) -> list[Image.Image]:
        factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, device=latents.device)
        bias = torch.tensor(SDXL_LATENT_RGB_BIAS, device=latents.device)
        rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors) + bias
        pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        # One pixel per latent: upscaled to the render size, as the other decoders give.
        return [
            Image.fromarray(one).resize((width, height), Image.Resampling.BILINEAR)
            for one in pixels
        ]

    return decode


def taesd_decoder(taesd: Any, width: int, height: int) -> LatentDecoder:
    """Latents -> RGB by the tiny autoencoder: the whole batch in one call, x8 as the VAE."""

    def decode(latents: torch.Tensor) -> list[Image.Image]:
        # As diffusers' SDXL pipeline decodes with any VAE: latents / scaling_factor.
        # taesd's is 1.0: it decodes the UNet's latents themselves, not the SDXL
        # VAE's (UNet latents / 0.13025).
        scaled = latents.to(device=taesd.device, dtype=taesd.dtype) / float(
            taesd.config.scaling_factor
        )
        pixels = taesd.decode(scaled, return_dict=False)[0]  # in [-1, 1], as the VAE's
        pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
        rgb = pixels.permute(0, 2, 3, 1).mul(255).round().to(torch.uint8).cpu().numpy()
        images = [Image.fromarray(one) for one in rgb]
        return [
            image
            if image.size == (width, height)
            else image.resize((width, height), Image.Resampling.BILINEAR)
            for image in images
        ]

    return decode


def taesd_source(config: EngineConfig, preset: Preset) -> str:
    """SDXL_PREVIEW_MODEL; the tiny preset's own tiny taesd, as it has its own SDXL pair."""
    if preset is Preset.TINY:
        from .tiny import ensure_tiny_pair, tiny_taesd_dir

        ensure_tiny_pair(config.cache_dir)
        return str(tiny_taesd_dir(config.cache_dir))
    return config.preview_model


class PreviewDecoders:
    """One engine's preview decoders: its VAE's codec, and taesd loaded once when first needed."""

    def __init__(self, codec: LatentCodec, load_taesd: Callable[[], Any]) -> None:
        self.codec = codec
        self._load_taesd = load_taesd
        self._taesd: Any = None
        self._lock = threading.Lock()

    @classmethod
    def for_engine(
        cls,
        codec: LatentCodec,
        config: EngineConfig,
        *,
        preset: Preset,
        device: str,
        dtype: torch.dtype,
    ) -> PreviewDecoders:
        def load() -> Any:
            return load_preview_model(
                taesd_source(config, preset),
                cache_dir=config.cache_dir,
                device=device,
                dtype=dtype,
            )

        return cls(codec, load)

    @property
    def taesd(self) -> Any:
        """The tiny autoencoder, loaded at the first use (PreviewModelError if it cannot be)."""
        with self._lock:
            if self._taesd is None:
                self._taesd = self._load_taesd()
            return self._taesd

    def use_taesd(self, taesd: Any) -> None:
        """Decode taesd previews with this module (the GPU bench's random-weight taesdxl)."""
        with self._lock:
            self._taesd = taesd

    def prepare(self, name: str) -> None:
        """Loads what decoder `name` needs now (at startup), not during a render."""
        if PreviewDecoder(name) is PreviewDecoder.TAESD:
            _ = self.taesd

    def decoder(self, name: str, params: RenderParams) -> LatentDecoder:
        """The decoder SDXL_PREVIEW_DECODER names, for images of the render's size."""
        choice = PreviewDecoder(name)
        if choice is PreviewDecoder.VAE:
            return self.codec.decode
        if choice is PreviewDecoder.TAESD:
            return taesd_decoder(self.taesd, params.width, params.height)
        return approx_decoder(params.width, params.height)


# --- which steps, which tasks -------------------------------------------------


def total_steps(
    params: RenderParams, *, base_runs: bool, scheduler_config: Mapping[str, Any]
) -> int:
    """The denoising steps a render runs, base and refiner together: diffusers' counts of
    UNet calls (of `callback_on_step_end`)."""
    if RefinerMode(params.refiner) is RefinerMode.ENSEMBLE:
        split = ensemble_split(
            params.num_inference_steps,
            params.high_noise_frac,
            params.scheduler,
            scheduler_config,
            strength=params.strength,
            schedule_type=params.schedule_type,
        )
        return sum(split)

    # A second-order scheduler (Heun, DPM2) calls the UNet twice a step but once on the first.
    order: int = make_scheduler(params.scheduler, scheduler_config, params.schedule_type).order

    def img2img_steps(strength: float) -> int:  # diffusers' get_timesteps
        steps = min(int(params.num_inference_steps * strength), params.num_inference_steps)
        return max(steps * order - (order - 1), 0)

    handover = refiner_handover(params, base_runs=base_runs)
    refiner = 0 if handover is None else img2img_steps(handover["strength"])
    return img2img_steps(params.strength) + refiner


def preview_schedule(counts: Sequence[int], steps: int) -> PreviewSchedule:
    """Task i's k previews after the steps at fractions j/(k+1) of `steps`, j = 1..k."""
    schedule: PreviewSchedule = {}
    for task, count in enumerate(counts):
        for preview in range(count):
            step = max(1, round(steps * (preview + 1) / (count + 1)))
            schedule.setdefault(step, []).append((task, preview))
    return schedule


class PreviewTap:
    """One batch's previews: counts steps across its stages, decodes where asked.

    At a preview step only the images whose task wants a preview there are
    decoded, in one decoder call; the others lose no time beyond it.
    """

    def __init__(
        self, schedule: PreviewSchedule, on_preview: PreviewCallback, decode: LatentDecoder
    ) -> None:
        self.schedule = schedule
        self.on_preview = on_preview
        self.decode = decode
        self.steps_done = 0

    def attach(self, scheduler: Any) -> None:
        capture_clean_latents(scheduler, self._after_step)

    def _after_step(self, clean_latents: torch.Tensor) -> None:
        self.steps_done += 1
        wanted = self.schedule.get(self.steps_done)
        if not wanted:
            return
        tasks = sorted({task for task, _ in wanted})
        images = dict(zip(tasks, self.decode(clean_latents[tasks]), strict=True))
        for task, preview in wanted:
            self.on_preview(task, preview, images[task])


def preview_tap(
    batch: RenderBatch,
    decoder: str,
    decoders: PreviewDecoders,
    *,
    base_runs: bool,
    scheduler_config: Mapping[str, Any],
) -> PreviewTap | None:
    """The batch's PreviewTap; None (nothing to attach, no work) when it asks for none."""
    counts = batch.preview_counts
    if batch.on_preview is None or not any(counts):
        return None
    if len(counts) != len(batch.tasks) or not all(0 <= n <= MAX_PREVIEWS for n in counts):
        raise ValueError(f"preview_counts needs 0..{MAX_PREVIEWS} for each of the batch's tasks")
    steps = total_steps(batch.params, base_runs=base_runs, scheduler_config=scheduler_config)
    decode = decoders.decoder(decoder, batch.params)
    return PreviewTap(preview_schedule(counts, steps), batch.on_preview, decode)
