"""Loads the SDXL base + refiner pair and renders batches of images.

Imported only inside the GPU process (and by tests and the GPU bench).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image

from .choices import Attention, DType, Preset, RefinerMode, RenderKind, SchedulerName
from .jobs import ImageTask, OutOfMemory, RenderBatch, RenderCancelled, RenderParams
from .schedulers import make_scheduler
from .settings import Settings
from .tiny import cast_module, ensure_tiny_pair

logger = logging.getLogger(__name__)

StageObserver = Callable[[str, float], None]

COMPILE_MODE = "max-autotune"

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; use float16/fp16, bfloat16/bf16 or float32/fp32"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_preset(settings: Settings) -> Preset:
    if settings.preset is not Preset.AUTO:
        return Preset(settings.preset)
    if torch.cuda.is_available():
        return Preset.SDXL
    logger.warning(
        "!!! No CUDA GPU found: SDXL_PRESET=auto falls back to the TINY preset, a random-weight "
        "SDXL pair whose images are noise. Set SDXL_PRESET=sdxl to load the real models anyway. !!!"
    )
    return Preset.TINY


def resolve_device(settings: Settings) -> str:
    if settings.device != "auto":
        return settings.device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(settings: Settings, device: str) -> torch.dtype:
    if settings.dtype != DType.AUTO:
        return parse_dtype(settings.dtype)
    return torch.float16 if device.startswith("cuda") else torch.float32


def resolve_vae_dtype(settings: Settings, dtype: torch.dtype, vae: Any) -> torch.dtype:
    """The dtype the VAE decodes in.

    `auto` follows the pipeline dtype, except fp16 with a VAE that declares
    `force_upcast` (the stock SDXL VAE, which overflows to NaN in fp16): that
    one decodes in float32, as diffusers does, but is kept there instead of
    being cast up and down around every decode.
    """
    if settings.vae_dtype != DType.AUTO:
        return parse_dtype(settings.vae_dtype)
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _synchronize(device: str | torch.device) -> None:
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()


def _from_pretrained(
    pipeline_class: Any, source: str, *, dtype: torch.dtype, variant: str | None, **components: Any
) -> Any:
    options: dict[str, Any] = {
        # `dtype`, not the `torch_dtype` diffusers 0.42 deprecates.
        "dtype": dtype,
        "use_safetensors": True,
        # Images are decoded here, not by the pipelines, so their watermarker would
        # never run; off explicitly so it does not depend on what is installed.
        "add_watermarker": False,
        **components,
    }
    if variant:
        try:
            return pipeline_class.from_pretrained(source, variant=variant, **options)
        except (ValueError, OSError) as error:
            if "variant" not in str(error):
                raise
            logger.info(
                "%s has no %r weights variant; loading the default weights", source, variant
            )
    return pipeline_class.from_pretrained(source, **options)


def load_pipelines(
    base_source: str, refiner_source: str, *, dtype: torch.dtype, variant: str | None
) -> tuple[Any, Any]:
    """Base and refiner from hub ids or diffusers folders, sharing text_encoder_2 and the VAE."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = _from_pretrained(StableDiffusionXLPipeline, base_source, dtype=dtype, variant=variant)
    refiner = _from_pretrained(
        StableDiffusionXLImg2ImgPipeline,
        refiner_source,
        dtype=dtype,
        variant=variant,
        text_encoder_2=base.text_encoder_2,
        vae=base.vae,
    )
    return base, refiner


def edit_pipelines(base: Any, refiner: Any) -> tuple[Any, Any, Any]:
    """Base img2img, base inpaint and refiner inpaint pipelines over the loaded modules.

    Built with the constructors, not `from_pipe`: from_pipe ends with
    `pipeline.to(dtype)` (float32 unless told), which would cast the shared
    UNets and the VAE kept in its own dtype. The config flags are passed on by
    hand because `components` holds modules only.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    def flags(pipeline: Any) -> dict[str, Any]:
        return {
            "requires_aesthetics_score": pipeline.config.get("requires_aesthetics_score", False),
            "force_zeros_for_empty_prompt": pipeline.config.force_zeros_for_empty_prompt,
            "add_watermarker": False,
        }

    pipelines = (
        StableDiffusionXLImg2ImgPipeline(**base.components, **flags(base)),
        StableDiffusionXLInpaintPipeline(**base.components, **flags(base)),
        StableDiffusionXLInpaintPipeline(**refiner.components, **flags(refiner)),
    )
    for pipeline in pipelines:
        pipeline.set_progress_bar_config(disable=True)
    return pipelines


def apply_optimisations(
    base: Any,
    refiner: Any,
    settings: Settings,
    *,
    device: str,
    dtype: torch.dtype,
    force_compile: bool = False,
    compile_mode: str = COMPILE_MODE,
) -> dict[str, Any]:
    """Switch on the optimisations `settings` asks for; return what is on.

    The one place the service and the GPU bench configure the models. Call it
    once, on unoptimised pipelines already on `device`.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unets = [base.unet, refiner.unet]
    vae = base.vae
    applied: dict[str, Any] = {}

    processor_class = AttnProcessor2_0 if settings.attention == Attention.SDPA else AttnProcessor
    for module in [*unets, vae]:
        module.set_attn_processor(processor_class())
    applied["attention"] = str(settings.attention)

    vae_dtype = resolve_vae_dtype(settings, dtype, vae)
    if vae.dtype != vae_dtype:
        cast_module(vae, vae_dtype)
    applied["vae_dtype"] = dtype_name(vae_dtype)

    if settings.channels_last:
        for module in [*unets, vae]:
            module.to(memory_format=torch.channels_last)
    applied["channels_last"] = settings.channels_last

    if settings.fuse_qkv:
        if settings.attention == Attention.EAGER:
            logger.warning(
                "fuse_qkv runs the fused projections through SDPA; attention=eager ignored"
            )
            applied["attention"] = "sdpa"
        # Module by module: the VAE is shared, and pipeline.fuse_qkv_projections
        # on both pipelines would fuse it twice.
        for module in [*unets, vae]:
            module.fuse_qkv_projections()
    applied["fuse_qkv"] = settings.fuse_qkv

    compiled = False
    if settings.compile:
        if _is_cuda(device) or force_compile:
            _configure_inductor()
            # In place (`Module.compile`), so the pipelines keep their own module
            # types and configs.
            for unet in unets:
                unet.compile(mode=compile_mode, fullgraph=True)
            vae.decoder.compile(mode=compile_mode, fullgraph=True)
            compiled = True
        else:
            logger.warning("SDXL_COMPILE is on but the device is %s: not compiling", device)
    applied["compile"] = compile_mode if compiled else False
    return applied


def _configure_inductor() -> None:
    # The inductor settings diffusers' "accelerate inference of text-to-image
    # diffusion models" guide uses for SDXL. Coordinate-descent tuning lengthens
    # the (already minutes-long) max-autotune compile; not measured here yet.
    import torch._inductor.config as inductor_config

    inductor_config.conv_1x1_as_mm = True
    inductor_config.coordinate_descent_tuning = True
    inductor_config.epilogue_fusion = False
    inductor_config.coordinate_descent_check_all_directions = True


class Engine:
    """Both SDXL pipelines on one device, rendering one `RenderBatch` at a time."""

    def __init__(
        self,
        base: Any,
        refiner: Any,
        settings: Settings,
        *,
        preset: Preset = Preset.SDXL,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        base_source: str = "",
        refiner_source: str = "",
        stage_observer: StageObserver | None = None,
        force_compile: bool = False,
        compile_mode: str = COMPILE_MODE,
    ) -> None:
        self.base = base
        self.refiner = refiner
        self.settings = settings
        self.preset = preset
        self.device = device or str(base.device)
        self.dtype = dtype or base.unet.dtype
        self.base_source = base_source
        self.refiner_source = refiner_source
        self.stage_observer = stage_observer
        self.native_resolution = int(base.unet.config.sample_size) * int(base.vae_scale_factor)
        # Kept apart: each render gets fresh schedulers built from these.
        self._base_scheduler_config = dict(base.scheduler.config)
        self._refiner_scheduler_config = dict(refiner.scheduler.config)
        for pipeline in (base, refiner):
            pipeline.set_progress_bar_config(disable=True)
        # Edits run the same modules through these (no extra memory).
        self.base_img2img, self.base_inpaint, self.refiner_inpaint = edit_pipelines(base, refiner)
        self.optimisations = apply_optimisations(
            base,
            refiner,
            settings,
            device=self.device,
            dtype=self.dtype,
            force_compile=force_compile,
            compile_mode=compile_mode,
        )

    @classmethod
    def load(cls, settings: Settings, stage_observer: StageObserver | None = None) -> Engine:
        preset = resolve_preset(settings)
        device = resolve_device(settings)
        dtype = resolve_dtype(settings, device)
        if preset is Preset.TINY:
            base_dir, refiner_dir = ensure_tiny_pair(settings.cache_dir)
            base_source, refiner_source = str(base_dir), str(refiner_dir)
        else:
            base_source, refiner_source = settings.base_model, settings.refiner_model
        # Half-precision variants halve the download; fp32 runs want the full weights.
        variant = settings.variant if _is_cuda(device) and dtype != torch.float32 else None

        started = time.perf_counter()
        base, refiner = load_pipelines(base_source, refiner_source, dtype=dtype, variant=variant)
        base.to(device)
        refiner.to(device)  # moves only the refiner's UNet: the rest is shared or already there
        engine = cls(
            base,
            refiner,
            settings,
            preset=preset,
            device=device,
            dtype=dtype,
            base_source=base_source,
            refiner_source=refiner_source,
            stage_observer=stage_observer,
        )
        logger.info(
            "pipelines loaded in %.1f s: %s", time.perf_counter() - started, engine.describe()
        )
        return engine

    @property
    def vae(self) -> Any:
        return self.base.vae

    def describe(self) -> dict[str, Any]:
        return {
            "base": self.base_source,
            "refiner": self.refiner_source,
            "preset": str(self.preset),
            "device": self.device,
            "dtype": dtype_name(self.dtype),
            "native_resolution": self.native_resolution,
            "optimisations": dict(self.optimisations),
        }

    def warmup(self, steps: int = 2) -> None:
        """One small render at native resolution (compiles kernels when compile is on)."""
        side = self.native_resolution
        params = RenderParams(
            width=side,
            height=side,
            steps=steps,
            guidance_scale=5.0,
            high_noise_frac=0.5,
            refiner=RefinerMode.ENSEMBLE,
            scheduler=SchedulerName.EULER,
        )
        self.render(RenderBatch(params=params, tasks=[ImageTask(prompt="warmup", seed=0)]))

    # --- rendering ----------------------------------------------------------

    def render(self, batch: RenderBatch) -> list[Image.Image]:
        """RGB images of `params.width` x `params.height`, in task order."""
        if not batch.tasks:
            return []
        out_of_memory: str | None = None
        try:
            with torch.inference_mode():
                return self._render(batch)
        except torch.OutOfMemoryError as error:
            # Only the message leaves this block: the traceback pins the frames
            # (and their tensors) until the handler ends.
            out_of_memory = str(error).strip().splitlines()[0] if str(error).strip() else ""
        self._free_memory()
        params = batch.params
        raise OutOfMemory(
            f"{self.device} ran out of memory rendering {len(batch.tasks)} image(s) at "
            f"{params.width}x{params.height}; try fewer images or a smaller size"
            + (f" ({out_of_memory})" if out_of_memory else "")
        )

    def _free_memory(self) -> None:
        gc.collect()
        if _is_cuda(self.device):
            torch.cuda.empty_cache()

    def _render(self, batch: RenderBatch) -> list[Image.Image]:
        latents = self._denoise(batch)
        self._check_stop(batch)
        with self._stage("decode"):
            return self._decode(latents, batch.should_stop)

    def _denoise(self, batch: RenderBatch) -> torch.Tensor:
        """The batch's final latents: base and refiner as its RenderParams say."""
        params = batch.params
        mode = RefinerMode(params.refiner)
        kind = RenderKind(params.kind)
        prompts = [task.prompt for task in batch.tasks]
        negative_prompts = [task.negative_prompt for task in batch.tasks]
        # One CPU generator per image: the same seed gives the same starting noise
        # on any machine (CPU dev box or any GPU), and an image does not depend on
        # its neighbours in the batch. Drawing 4 x h/8 x w/8 numbers on the CPU and
        # copying them costs microseconds next to a UNet step.
        generators = [torch.Generator("cpu").manual_seed(task.seed) for task in batch.tasks]

        def stop_if_asked(_pipeline: Any, _step: int, _timestep: Any, tensors: dict) -> dict:
            if batch.should_stop():
                raise RenderCancelled("render cancelled: nobody waits for these images")
            return tensors

        common = {
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": 1,
            "generator": generators,
            "output_type": "latent",
            "callback_on_step_end": stop_if_asked,
        }
        size = {"width": params.width, "height": params.height}

        base, refiner = self.base, self.refiner
        base_inputs: dict[str, Any] = dict(size)
        refiner_inputs: dict[str, Any] = {}
        latents: torch.Tensor | None = None
        # An edit starts at noise level `strength`. In the ensemble the base takes
        # the part of that above high_noise_frac; when none is, the refiner alone
        # edits from `strength` (handing it un-denoised base latents at
        # denoising_start would start it from a noise level they do not have).
        refiner_only = False
        if kind is not RenderKind.TEXT_TO_IMAGE:
            self._check_stop(batch)
            with self._stage("vae_encode"):
                latents = self._encode([task.init_image for task in batch.tasks], params)
            base_inputs = {"image": latents, "strength": params.strength}
            if kind is RenderKind.INPAINT:
                masks = [
                    Image.frombytes("L", (params.width, params.height), task.mask)
                    for task in batch.tasks
                ]
                refiner_inputs = {"mask_image": masks, **size}
                base_inputs |= refiner_inputs
                base, refiner = self.base_inpaint, self.refiner_inpaint
            else:
                base = self.base_img2img
            refiner_only = mode is RefinerMode.ENSEMBLE and self._base_steps_of_edit(params) == 0

        if not refiner_only:
            self._check_stop(batch)
            with self._stage("base"):
                base.scheduler = make_scheduler(params.scheduler, self._base_scheduler_config)
                embeddings = self._base_prompt_embeddings(
                    prompts, negative_prompts, params.guidance_scale
                )
                latents = base(
                    **embeddings,
                    **base_inputs,
                    denoising_end=params.high_noise_frac if mode is RefinerMode.ENSEMBLE else None,
                    **common,
                ).images

        if mode is RefinerMode.NONE:
            return latents
        self._check_stop(batch)
        with self._stage("refiner"):
            refiner.scheduler = make_scheduler(params.scheduler, self._refiner_scheduler_config)
            if refiner_only:
                handover = {"strength": params.strength}
            elif mode is RefinerMode.ENSEMBLE:
                handover = {"denoising_start": params.high_noise_frac}
            else:
                # An edit's refiner pass re-noises no more than the edit itself did.
                share = sequential_strength(params.steps, params.high_noise_frac)
                handover = {"strength": min(params.strength, share)}
            return refiner(
                prompt=prompts,
                negative_prompt=negative_prompts,
                image=latents,
                **handover,
                **refiner_inputs,
                **common,
            ).images

    def _base_steps_of_edit(self, params: RenderParams) -> int:
        """Denoising steps the base runs of an ensemble edit.

        The steps of the edit's schedule (diffusers' img2img `get_timesteps`:
        the last int(steps * strength)) at or above the `denoising_end` cut-off.
        """
        scheduler = make_scheduler(params.scheduler, self._base_scheduler_config)
        scheduler.set_timesteps(params.steps)
        skipped = params.steps - min(int(params.steps * params.strength), params.steps)
        train_steps = scheduler.config.num_train_timesteps
        cutoff = round(train_steps - params.high_noise_frac * train_steps)
        return int((scheduler.timesteps[skipped * scheduler.order :] >= cutoff).sum())

    def _encode(self, images: list[bytes | None], params: RenderParams) -> torch.Tensor:
        """Init images (raw RGB) -> latents scaled as the UNets take them.

        Done here, not by the pipelines: their encode casts the shared VAE to the
        UNet dtype after upcasting it (undoing a float32 VAE kept for fp16), and
        samples the posterior. Its mean is used instead, so the seed decides only
        the added noise (SDXL's VAE posterior is narrow: no visible difference).
        One image at a time, as in `_decode`; the n images of one request share
        their bytes and are encoded once.
        """
        vae = self.vae
        config = vae.config
        latents_mean = getattr(config, "latents_mean", None)
        latents_std = getattr(config, "latents_std", None)
        encoded: dict[bytes, torch.Tensor] = {}
        latents = []
        for rgb in images:
            if rgb is None:
                raise ValueError(f"a {params.kind} render needs an init image for every task")
            if rgb not in encoded:
                pixels = torch.frombuffer(bytearray(rgb), dtype=torch.uint8)
                pixels = pixels.view(params.height, params.width, 3).permute(2, 0, 1)[None]
                sample = pixels.to(device=self.device, dtype=vae.dtype) / 127.5 - 1.0
                mean = vae.encode(sample).latent_dist.mode()
                if latents_mean is not None and latents_std is not None:
                    shift = torch.tensor(latents_mean, device=mean.device, dtype=mean.dtype)
                    scale = torch.tensor(latents_std, device=mean.device, dtype=mean.dtype)
                    mean = (
                        (mean - shift.view(1, -1, 1, 1))
                        * config.scaling_factor
                        / scale.view(1, -1, 1, 1)
                    )
                else:
                    mean = mean * config.scaling_factor
                encoded[rgb] = mean
            latents.append(encoded[rgb])
        return torch.cat(latents).to(self.dtype)

    def _base_prompt_embeddings(
        self, prompts: list[str], negative_prompts: list[str], guidance_scale: float
    ) -> dict[str, Any]:
        """Text embeddings for the base, with empty negatives zeroed image by image.

        diffusers zeroes the negative embeddings (force_zeros_for_empty_prompt,
        how SDXL base was tuned) only when no negative prompt is passed at all;
        done per image here so an image with no negative prompt is the same
        whether or not its batch neighbours have one.
        """
        base = self.base
        do_guidance = guidance_scale > 1 and base.unet.config.time_cond_proj_dim is None
        embeds, negative_embeds, pooled, negative_pooled = base.encode_prompt(
            prompt=prompts,
            device=base._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_guidance,
            negative_prompt=negative_prompts if do_guidance else None,
        )
        if do_guidance and base.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([not text for text in negative_prompts], device=embeds.device)
            negative_embeds = torch.where(empty[:, None, None], 0, negative_embeds)
            negative_pooled = torch.where(empty[:, None], 0, negative_pooled)
        return {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative_embeds,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def _decode(
        self, latents: torch.Tensor, should_stop: Callable[[], bool] = lambda: False
    ) -> list[Image.Image]:
        vae = self.vae
        config = vae.config
        vae_dtype = vae.dtype
        latents = latents.to(device=self.device, dtype=vae_dtype)
        latents_mean = getattr(config, "latents_mean", None)
        latents_std = getattr(config, "latents_std", None)
        if latents_mean is not None and latents_std is not None:
            channels = latents.shape[1]
            mean = torch.tensor(latents_mean, device=latents.device, dtype=vae_dtype)
            std = torch.tensor(latents_std, device=latents.device, dtype=vae_dtype)
            latents = latents * std.view(1, channels, 1, 1) / config.scaling_factor + mean.view(
                1, channels, 1, 1
            )
        else:
            latents = latents / config.scaling_factor

        images = []
        # One image at a time: decode at 1024 px is conv-bound already at batch 1,
        # its float32 activations for a batch of 8 would take gigabytes, and a
        # cancelled batch stops between images.
        for one in latents.split(1):
            if images and should_stop():
                raise RenderCancelled("render cancelled: nobody waits for these images")
            pixels = vae.decode(one, return_dict=False)[0]
            pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
            rgb = (pixels[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
            images.append(Image.fromarray(rgb))
        return images

    def _check_stop(self, batch: RenderBatch) -> None:
        if batch.should_stop():
            raise RenderCancelled("render cancelled: nobody waits for these images")

    @contextmanager
    def _stage(self, stage: str) -> Iterator[None]:
        _synchronize(self.device)
        started = time.perf_counter()
        yield
        _synchronize(self.device)
        if self.stage_observer is not None:
            self.stage_observer(stage, time.perf_counter() - started)


def sequential_strength(steps: int, high_noise_frac: float) -> float:
    """img2img strength for the sequential refiner: the last (1 - high_noise_frac) of the steps.

    The refiner re-noises the finished base latents to the noise level at
    `high_noise_frac` and denoises from there, the same share of the schedule
    it takes in the ensemble. At least one step, and half a step of slack
    because diffusers truncates `int(steps * strength)`.
    """
    refiner_steps = max(1, round(steps * (1.0 - high_noise_frac)))
    return min(1.0, (refiner_steps + 0.5) / steps)
