"""The Engine: both SDXL pipelines on one device, rendering one batch of images at a time."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from ..choices import HiresUpscaler, Preset, RefinerMode, RenderKind, SchedulerName, Switch
from ..contract.render_request import RenderParams
from ..embedding_catalog import EmbeddingCatalog
from ..lora_catalog import LoraCatalog
from ..metrics import ServiceMetrics
from ..model_catalog import INPAINTING, TEXT_TO_IMAGE, inpainting_text_to_image
from .config import EngineConfig
from .controlnets import ControlNetModels
from .devices import (
    dtype_name,
    free_memory,
    is_cuda,
    resolve_device,
    resolve_dtype,
    resolve_preset,
    synchronize,
)
from .embeddings import TextualInversions, encoder_widths
from .handover import ensemble_split, refiner_handover
from .inpainting import is_inpainting_unet
from .ip_adapters import IpAdapterModels
from .latents import LatentCodec
from .loading import edit_pipelines, load_pipelines
from .loras import LoraAdapters
from .model_cache import BaseModelPipelines, ModelCache
from .optimisations import COMPILE_MODE, apply_optimisations, optimise_module
from .previews import PreviewDecoders, preview_tap
from .prompts import image_chunk_counts, prompt_embeddings
from .render_batch import (
    ImageTask,
    InvalidModel,
    InvalidUpscaler,
    OutOfMemory,
    RenderBatch,
    RenderCancelled,
)
from .safety import SafetyChecker
from .schedulers import make_scheduler
from .upscalers import UnusableUpscaler, UpscalerModels

logger = logging.getLogger(__name__)

StageObserver = Callable[[str, float], None]


@dataclass(frozen=True)
class DenoisePlan:
    """What one batch runs: which pipelines, which stages, where the refiner takes over."""

    base: Any  # the base pipeline for the render kind (text-to-image, img2img or inpaint)
    refiner: Any
    encodes_init_images: bool  # edits: the init images are the starting latents
    inpaints: bool  # the request's mask goes to both stages
    base_runs: bool
    denoising_end: float | None  # where the base stops; None: at the end of its schedule
    refiner_handover: dict[str, Any] | None  # None: no refiner pass
    # An inpainting checkpoint's UNet (9 channels) conditions on the mask and the masked
    # picture in every edit; an edit without a mask repaints all of it (full_mask).
    conditions_on_mask: bool = False
    full_mask: bool = False


class Engine:
    """Both SDXL pipelines on one device, rendering one `RenderBatch` at a time."""

    def __init__(
        self,
        base: Any,
        refiner: Any,
        config: EngineConfig,
        *,
        preset: Preset = Preset.SDXL,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        base_source: str = "",
        refiner_source: str = "",
        stage_observer: StageObserver | None = None,
        metrics: ServiceMetrics | None = None,
        force_compile: bool = False,
        compile_mode: str = COMPILE_MODE,
    ) -> None:
        self.refiner = refiner
        self.config = config
        self.preset = preset
        self.device = device or str(base.device)
        self.dtype = dtype or base.unet.dtype
        self.base_source = base_source
        self.refiner_source = refiner_source
        self.stage_observer = stage_observer
        # SDXL_SAFETY_CHECKER's classifier (Engine.load); the render worker screens each
        # rendered batch with it (render/batcher.py).
        self.safety: SafetyChecker | None = None
        self.native_resolution = int(base.unet.config.sample_size) * int(base.vae_scale_factor)
        # The batcher counts each queued image's chunks before its batch is picked, outside
        # the render (~0.5 ms of tokenizing per request on 2 CPU cores, make bench-overhead);
        # the same prompts come back with other seeds, and the count depends on nothing else.
        self._chunk_counts = functools.lru_cache(maxsize=1024)(self._count_chunks)
        # Embeddings of SDXL_EMBEDDINGS_DIR that prompts name (engine/embeddings.py).
        self.embeddings = TextualInversions(EmbeddingCatalog(config.embeddings_dir))
        # Kept apart: each render gets fresh schedulers built from these.
        self._refiner_scheduler_config = dict(refiner.scheduler.config)
        for pipeline in (base, refiner):
            pipeline.set_progress_bar_config(disable=True)
        # Edits run the same modules through these (no extra memory).
        base_img2img, base_inpaint, self.refiner_inpaint = edit_pipelines(base, refiner)
        default = BaseModelPipelines(
            name=None,
            base=base,
            img2img=base_img2img,
            inpaint=base_inpaint,
            loras=LoraAdapters(
                base,
                LoraCatalog(config.lora_folder),
                capacity=config.lora_cache,
                device=self.device,
                metrics=metrics,
            ),
            latent_codec=LatentCodec(
                base.vae, device=self.device, dtype=self.dtype, tiling=config.vae_tiling
            ),
            scheduler_config=dict(base.scheduler.config),
        )
        # The base model a batch renders with: the default, or one of SDXL_MODELS_DIR's
        # while its batch renders (render()).
        self._active = default
        self.models = ModelCache(
            default, refiner, config, device=self.device, dtype=self.dtype, metrics=metrics
        )
        # Upscaler models of SDXL_UPSCALER_DIR, loaded on first use (engine/upscalers.py).
        self.upscalers = UpscalerModels(config.upscaler_dir, self.device, tile=config.upscaler_tile)
        # ControlNets of SDXL_CONTROLNET_DIR, loaded on first use (engine/controlnets.py).
        self.controlnets = ControlNetModels(
            config.controlnet_dir,
            device=self.device,
            dtype=self.dtype,
            capacity=config.control_cache,
            metrics=metrics,
            optimise=functools.partial(
                optimise_module,
                config=config,
                device=self.device,
                dtype=self.dtype,
                force_compile=force_compile,
                compile_mode=compile_mode,
            ),
        )
        # IP-Adapters of SDXL_IP_ADAPTER_DIR, loaded on first use (engine/ip_adapters.py).
        self.ip_adapters = IpAdapterModels(
            config.ip_adapter_dir,
            capacity=config.control_cache,
            device=self.device,
            dtype=self.dtype,
            metrics=metrics,
        )
        self.preview_decoders = PreviewDecoders.for_engine(
            self.latent_codec, config, preset=preset, device=self.device, dtype=self.dtype
        )
        self.optimisations = apply_optimisations(
            base,
            refiner,
            config,
            device=self.device,
            dtype=self.dtype,
            force_compile=force_compile,
            compile_mode=compile_mode,
        )

    @classmethod
    def load(
        cls,
        config: EngineConfig,
        stage_observer: StageObserver | None = None,
        metrics: ServiceMetrics | None = None,
    ) -> Engine:
        # Here, not at the top: tiny builds its pair with this package's components.
        from .tiny import ensure_tiny_pair

        preset = resolve_preset(config)
        device = resolve_device(config)
        dtype = resolve_dtype(config, device, preset)
        if preset is Preset.TINY:
            base_dir, refiner_dir = ensure_tiny_pair(config.cache_dir)
            base_source, refiner_source = str(base_dir), str(refiner_dir)
        else:
            base_source, refiner_source = config.base_model, config.refiner_model
        started = time.perf_counter()
        # First: a checker that cannot load stops the start before minutes of SDXL loading.
        safety = (
            None
            if config.safety_checker is None
            else SafetyChecker.load(
                config.safety_checker, config.safety_labels, device=device, dtype=dtype
            )
        )
        # Which files of SDXL_VARIANT each folder or repo loads is decided by what it
        # holds and the dtype (loading.choose_variant), not by the device.
        base, refiner = load_pipelines(
            base_source,
            refiner_source,
            dtype=dtype,
            variant=config.variant,
            vae_source=config.vae,
            cache_dir=config.cache_dir,
        )
        base.to(device)
        refiner.to(device)  # moves only the refiner's UNet: the rest is shared or already there
        engine = cls(
            base,
            refiner,
            config,
            preset=preset,
            device=device,
            dtype=dtype,
            base_source=base_source,
            refiner_source=refiner_source,
            stage_observer=stage_observer,
            metrics=metrics,
        )
        engine.safety = safety
        # taesd previews: loaded (downloaded) now, so that no request waits on it.
        engine.preview_decoders.prepare(config.preview_decoder)
        logger.info(
            "pipelines loaded in %.1f s: %s", time.perf_counter() - started, engine.describe()
        )
        return engine

    # The active base model's parts: the default's, except while a batch of another renders.
    @property
    def base(self) -> Any:
        return self._active.base

    @property
    def base_img2img(self) -> Any:
        return self._active.img2img

    @property
    def base_inpaint(self) -> Any:
        return self._active.inpaint

    @property
    def loras(self) -> LoraAdapters:
        return self._active.loras

    @property
    def latent_codec(self) -> LatentCodec:
        return self._active.latent_codec

    @property
    def _base_scheduler_config(self) -> dict[str, Any]:
        return self._active.scheduler_config

    @property
    def vae(self) -> Any:
        return self.base.vae

    @property
    def inpainting(self) -> bool:
        """Whether the active base model is an inpainting checkpoint (a 9-channel UNet)."""
        return is_inpainting_unet(self.base.unet)

    def describe(self) -> dict[str, Any]:
        # What the default base renders (GET /v1/models): edits alone, or text too.
        kind = INPAINTING if is_inpainting_unet(self.models.default.base.unet) else TEXT_TO_IMAGE
        return {
            "base": self.base_source,
            "refiner": self.refiner_source,
            "vae": self.config.vae or "the base model's",
            "preset": str(self.preset),
            "device": self.device,
            "dtype": dtype_name(self.dtype),
            "native_resolution": self.native_resolution,
            "kind": kind,
            "optimisations": dict(self.optimisations),
            # What an embedding's clip_l and clip_g vectors must be (the HTTP side checks).
            "embedding_widths": encoder_widths(self.models.default.base),
            # The default's: describe() may be called while another model's batch renders.
            **self.models.default.loras.describe(),
            **self.models.describe(),
            **self.controlnets.describe(),
            **self.ip_adapters.describe(),
            **({} if self.safety is None else {"safety_checker": self.safety.describe()}),
        }

    def warmup(self, steps: int = 2) -> bool:
        """One short render before the first request pays for it; False when skipped.

        On a GPU at native resolution: kernel selection (and compilation when it is on)
        is per shape, and that is the shape most requests have. On a CPU (SDXL_WARMUP=auto
        skips it there) there is nothing of the kind to pay for ahead: the warm-up is a
        full-cost render whose only gain is checking the path, and at full size even a
        64x64 one cost 15.5 s of the 52 s to /readyz, while the first 256x256 request
        after it ran no faster than stock diffusers' first (make bench-fullsize). With
        SDXL_WARMUP=on a CPU renders 64x64, which checks base, refiner and decode.
        """
        wanted = self.config.warmup
        if wanted is Switch.OFF or (wanted is Switch.AUTO and not self._on_gpu()):
            return False
        side = self.native_resolution if self._on_gpu() else min(self.native_resolution, 64)
        params = RenderParams(
            width=side,
            height=side,
            num_inference_steps=steps,
            guidance_scale=5.0,
            high_noise_frac=0.5,
            refiner=RefinerMode.ENSEMBLE,
            scheduler=SchedulerName.EULER,
        )
        task = ImageTask(prompt="warmup", seed=0)
        if self.inpainting:
            # An inpainting default renders nothing from text: its warm-up inpaints, all masked.
            params = params.model_copy(update={"kind": RenderKind.INPAINT})
            grey, repaint = bytes([128]) * (3 * side * side), bytes([255]) * (side * side)
            task = replace(task, init_image=grey, mask=repaint)
        self.render(RenderBatch(params=params, tasks=[task]))
        return True

    def _on_gpu(self) -> bool:
        return is_cuda(self.device) or self.device.startswith("mps")

    # --- rendering ----------------------------------------------------------

    def conditioning_chunks(self, task: ImageTask, params: RenderParams) -> int:
        """The 75-token chunks of the image's conditioning: images batch only with equal counts."""
        # The embeddings the prompts name, with their sizes, are part of the key: a file
        # added, changed or removed in the folder changes the count of the same text.
        sizes = self.embeddings.sizes((task.prompt, task.negative_prompt))
        return self._chunk_counts(
            task.prompt, task.negative_prompt, params.guidance_scale, tuple(sorted(sizes.items()))
        )

    def _count_chunks(
        self,
        prompt: str,
        negative_prompt: str,
        guidance_scale: float,
        sizes: tuple[tuple[str, int], ...] = (),
    ) -> int:
        syntax = self.config.prompt_syntax
        return image_chunk_counts(
            self.base, [prompt], [negative_prompt], guidance_scale, syntax, dict(sizes)
        )[0]

    def render(self, batch: RenderBatch) -> list[Image.Image]:
        """RGB images of `params.width` x `params.height`, in task order."""
        if not batch.tasks:
            return []
        out_of_memory: str | None = None
        try:
            # Outside inference mode: a model of SDXL_MODELS_DIR loads, PEFT creates the
            # adapters' parameters.
            with self._model(batch.params.model):
                self.loras.activate(batch.params.loras)
                adapters = batch.params.ip_adapters
                with self.ip_adapters.scope(self.base.unet, adapters), torch.inference_mode():
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
        free_memory(self.device)

    def _render(self, batch: RenderBatch) -> list[Image.Image]:
        upscale = batch.params.upscale
        if upscale is not None:
            with self._stage("hires_upscale"):
                pictures = self._through_upscaler(batch)
            if batch.params.strength == 0:
                # The upscaler model's picture alone: no denoising pass.
                return [
                    Image.frombytes("RGB", (batch.params.width, batch.params.height), picture)
                    for picture in pictures
                ]
            batch = replace(
                batch,
                params=batch.params.model_copy(update={"upscale": None}),
                tasks=[
                    replace(task, init_image=picture)
                    for task, picture in zip(batch.tasks, pictures, strict=True)
                ],
            )
            self._check_stop(batch)
        latents = self._denoise(batch) if batch.params.hires is None else self._hires(batch)
        self._check_stop(batch)
        with self._stage("decode"):
            return self.latent_codec.decode(latents, batch.should_stop)

    def _through_upscaler(self, batch: RenderBatch) -> list[bytes]:
        """Each task's init image (at the source's size) through the batch's upscaler model,
        then Lanczos to the render size: raw RGB bytes, as an edit's init image travels. The
        images of one job share one picture: it goes through the model once."""
        params = batch.params
        upscale = params.upscale
        assert upscale is not None
        done: dict[int, bytes] = {}
        pictures = []
        for task in batch.tasks:
            assert task.init_image is not None
            key = id(task.init_image)
            if key not in done:
                source = Image.frombytes(
                    "RGB", (upscale.source_width, upscale.source_height), task.init_image
                )
                done[key] = self._upscale_picture(
                    upscale.upscaler, source, params.width, params.height
                ).tobytes()
            pictures.append(done[key])
        return pictures

    def _upscale_picture(
        self, name: str, picture: Image.Image, width: int, height: int
    ) -> Image.Image:
        try:
            return self.upscalers.upscale(name, picture, width, height)
        except UnusableUpscaler as exc:
            raise InvalidUpscaler(f"The upscaler '{name}' cannot be used: {exc}.") from None

    def _hires(self, batch: RenderBatch) -> torch.Tensor:
        """AUTOMATIC1111's hires fix: the first pass at hires' first size (base and refiner as
        asked), upscaled to the render size, then an edit of it there at hires'
        denoising_strength over a schedule of hires' steps, with the same seeds; ControlNet
        units in both (text-to-image, then img2img, through their pipelines). Previews
        come from the second pass only: the size they are answered at. Steps count on
        across both passes: `on_step` hears 1..a over the first, a+1..a+b over the second."""
        params = batch.params
        hires = params.hires
        assert hires is not None
        first = params.model_copy(
            update={"width": hires.first_width, "height": hires.first_height, "hires": None}
        )
        first_steps = 0

        def on_first_step(step: int) -> None:
            nonlocal first_steps
            first_steps = step
            if batch.on_step is not None:
                batch.on_step(step)

        # ControlNet units act in both passes (sd-webui-controlnet's "Hires-Fix Option: Both",
        # its default), each with its map fitted to that pass's size.
        first_tasks = [
            replace(task, control_images=task.first_pass_control_images) for task in batch.tasks
        ]
        latents = self._denoise(
            RenderBatch(
                params=first,
                tasks=first_tasks,
                should_stop=batch.should_stop,
                on_step=on_first_step,
            )
        )
        self._check_stop(batch)
        second = params.model_copy(
            update={
                "kind": RenderKind.IMAGE_TO_IMAGE,
                "num_inference_steps": hires.steps,
                "strength": hires.denoising_strength,
                "hires": None,
            }
        )
        tasks = batch.tasks
        upscaled: torch.Tensor | None = None
        with self._stage("hires_upscale"):
            if hires.upscaler is HiresUpscaler.LATENT:
                # AUTOMATIC1111's "Latent" upscaler: bilinear, without antialiasing.
                scale = int(self.base.vae_scale_factor)
                size = (params.height // scale, params.width // scale)
                upscaled = torch.nn.functional.interpolate(latents, size=size, mode="bilinear")
            else:
                pictures = self.latent_codec.decode(latents, batch.should_stop)
                if hires.upscaler_model is not None:
                    # The model's own scale, then Lanczos to the size (AUTOMATIC1111's order).
                    pictures = [
                        self._upscale_picture(
                            hires.upscaler_model, picture, params.width, params.height
                        )
                        for picture in pictures
                    ]
                tasks = [
                    replace(task, init_image=resize_lanczos(picture, params.width, params.height))
                    for task, picture in zip(batch.tasks, pictures, strict=True)
                ]
        self._check_stop(batch)
        on_step = batch.on_step
        second_batch = replace(
            batch,
            params=second,
            tasks=tasks,
            on_step=None if on_step is None else lambda step: on_step(first_steps + step),
        )
        return self._denoise(second_batch, init_latents=upscaled)

    def _plan(self, params: RenderParams) -> DenoisePlan:
        mode = RefinerMode(params.refiner)
        kind = RenderKind(params.kind)
        edit = kind is not RenderKind.TEXT_TO_IMAGE
        inpainting = self.inpainting
        if inpainting and not edit:
            raise InvalidModel(inpainting_text_to_image(self._active.name))
        if kind is RenderKind.INPAINT:
            base, refiner = self.base_inpaint, self.refiner_inpaint
        elif inpainting:
            # AUTOMATIC1111's img2img on an inpainting model: the whole picture masked
            # (its "inpainting conditioning mask strength" 1.0), the refiner's img2img after.
            base, refiner = self.base_inpaint, self.refiner
        elif edit:
            base, refiner = self.base_img2img, self.refiner
        else:
            base, refiner = self.base, self.refiner
        # An edit starts at noise level `strength`. In the ensemble the base takes
        # the part of that above high_noise_frac; when none is, the refiner alone
        # edits from `strength`, as diffusers' refiner img2img/inpaint would from
        # the picture. Here, and only here, this departs from diffusers' ensemble
        # recipe, which would noise the picture to `strength`, run no base step
        # and start the refiner at denoising_start: from a noise level those
        # latents do not have, with more steps (10 steps, strength 0.15, 0.8:
        # 2 refiner steps from t=101 over latents noised to t=1, not 1 from t=1).
        base_runs = True
        if edit and mode is RefinerMode.ENSEMBLE:
            base_steps, _ = ensemble_split(
                params.num_inference_steps,
                params.high_noise_frac,
                params.scheduler,
                self._base_scheduler_config,
                strength=params.strength,
                schedule_type=params.schedule_type,
            )
            base_runs = base_steps > 0
        return DenoisePlan(
            base=base,
            refiner=refiner,
            encodes_init_images=edit,
            inpaints=kind is RenderKind.INPAINT,
            conditions_on_mask=inpainting,
            full_mask=inpainting and kind is not RenderKind.INPAINT,
            base_runs=base_runs,
            denoising_end=params.high_noise_frac if mode is RefinerMode.ENSEMBLE else None,
            refiner_handover=refiner_handover(params, base_runs=base_runs),
        )

    def _denoise(
        self, batch: RenderBatch, init_latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The batch's final latents: base and refiner as its RenderParams say. An edit
        starts from `init_latents` when given (the hires fix's upscaled latents), from its
        tasks' init images encoded otherwise."""
        params = batch.params
        syntax = self.config.prompt_syntax
        prompts = [task.prompt for task in batch.tasks]
        negative_prompts = [task.negative_prompt for task in batch.tasks]
        # The embeddings the prompts name (InvalidEmbedding when one cannot be used).
        vectors = self.embeddings.load(
            [("prompt", prompts), ("negative_prompt", negative_prompts)],
            encoder_widths(self.base),
        )
        sizes = {name: embedding.vectors for name, embedding in vectors.items()}
        # Prompts of different chunk counts cannot share a call: padding the
        # shorter with empty chunks would change its image. The batch policy
        # keeps them apart (render/batch_policy.py, BatchKey.chunks).
        counts = image_chunk_counts(
            self.base, prompts, negative_prompts, params.guidance_scale, syntax, sizes
        )
        if len(set(counts)) > 1:
            raise ValueError(
                f"a batch mixes conditioning of {sorted(set(counts))} 75-token chunks; "
                "images of different chunk counts render in separate batches"
            )
        plan = self._plan(params)
        previews = preview_tap(
            batch,
            self.config.preview_decoder,
            self.preview_decoders,
            base_runs=plan.base_runs,
            scheduler_config=self._base_scheduler_config,
        )

        # 1. Generators and the arguments both stages share
        # One CPU generator per image: the same seed gives the same starting noise
        # on any machine (CPU dev box or any GPU), and an image does not depend on
        # its neighbours in the batch. Drawing 4 x h/8 x w/8 numbers on the CPU and
        # copying them costs microseconds next to a UNet step.
        generators = [torch.Generator("cpu").manual_seed(task.seed) for task in batch.tasks]

        steps_done = 0

        def stop_if_asked(_pipeline: Any, _step: int, _timestep: Any, tensors: dict) -> dict:
            nonlocal steps_done
            steps_done += 1
            if batch.on_step is not None:
                batch.on_step(steps_done)
            self._check_stop(batch)
            return tensors

        common = {
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": 1,
            "generator": generators,
            "output_type": "latent",
            "callback_on_step_end": stop_if_asked,
        }
        size = {"width": params.width, "height": params.height}

        # 2. Encode the init images and masks (edits)
        latents: torch.Tensor | None = None
        base_inputs: dict[str, Any] = dict(size)
        refiner_inputs: dict[str, Any] = {}
        mask_inputs: dict[str, Any] = {}
        if plan.encodes_init_images and init_latents is not None:
            latents = init_latents
            base_inputs = {"image": latents, "strength": params.strength}
        elif plan.inpaints and params.controlnets and plan.base_runs:
            # The ControlNet inpaint pipeline encodes the pictures itself (engine/controlnets.py).
            masks = [self._mask(task, params) for task in batch.tasks]
            base_inputs = {
                "image": [self._picture(task, params) for task in batch.tasks],
                "mask_image": masks,
                "strength": params.strength,
                **size,
            }
            refiner_inputs = {"mask_image": masks, **size, "masked_picture_draws": False}
        elif plan.encodes_init_images:
            self._check_stop(batch)
            pictures = [task.init_image for task in batch.tasks]
            with self._stage("vae_encode"):
                if plan.conditions_on_mask and plan.base_runs and params.strength >= 1.0:
                    # diffusers' inpaint pipeline starts a 9-channel UNet from noise alone
                    # at strength 1, without encoding (or drawing for) the picture.
                    latents = self._unused_picture_latents(len(pictures), params)
                else:
                    # Draws from each generator before the base does, as diffusers does.
                    latents = self.latent_codec.encode(pictures, params, generators)
            base_inputs = {"image": latents, "strength": params.strength}
            if plan.inpaints or plan.full_mask:
                masks = [
                    full_mask(params) if plan.full_mask else self._mask(task, params)
                    for task in batch.tasks
                ]
                mask_inputs = {"mask_image": masks, **size}
                base_inputs |= mask_inputs
            if plan.conditions_on_mask:
                codec = self.latent_codec

                def masked_picture(mask: torch.Tensor) -> torch.Tensor:
                    return codec.encode_masked(pictures, mask, params, generators)

                base_inputs["masked_picture"] = masked_picture
            elif plan.inpaints:
                # The latents stand for the picture in the first stage that runs.
                base_inputs["masked_picture_draws"] = True
            if plan.inpaints:
                refiner_inputs = mask_inputs | {"masked_picture_draws": not plan.base_runs}

        # 3. Base
        if plan.base_runs:
            self._check_stop(batch)
            with self._stage("base"):
                plan.base.scheduler = make_scheduler(
                    params.scheduler, self._base_scheduler_config, params.schedule_type
                )
                if previews is not None:
                    previews.attach(plan.base.scheduler)
                embeddings = prompt_embeddings(
                    self.base,
                    prompts,
                    negative_prompts,
                    params.guidance_scale,
                    syntax,
                    params.clip_skip,
                    vectors,
                )
                call = {
                    **embeddings,
                    **base_inputs,
                    "denoising_end": plan.denoising_end,
                    **common,
                }
                pipeline = plan.base
                if params.controlnets:
                    pipeline, call = self.controlnets.stage(
                        plan.base, params, batch.tasks, call, self._base_scheduler_config
                    )
                # The pipeline that runs (a ControlNet one shares the UNet) takes the
                # IP-Adapters' image embeddings, one row per image.
                with self.ip_adapters.image_embeds(
                    pipeline, params.ip_adapters, batch.tasks, params.guidance_scale > 1
                ) as image_embeds:
                    latents = pipeline(**call, **image_embeds).images
        assert latents is not None  # the base ran, or the edit's latents were encoded

        # 4. Refiner
        if plan.refiner_handover is None:
            return latents
        self._check_stop(batch)
        with self._stage("refiner"), self.loras.refiner_scope():
            plan.refiner.scheduler = make_scheduler(
                params.scheduler, self._refiner_scheduler_config, params.schedule_type
            )
            if previews is not None:
                previews.attach(plan.refiner.scheduler)
            embeddings = prompt_embeddings(
                plan.refiner,
                prompts,
                negative_prompts,
                params.guidance_scale,
                syntax,
                params.clip_skip,
                vectors,
            )
            refined: torch.Tensor = plan.refiner(
                **embeddings,
                image=latents,
                **plan.refiner_handover,
                **refiner_inputs,
                **common,
            ).images
            return refined

    def _unused_picture_latents(self, count: int, params: RenderParams) -> torch.Tensor:
        scale = int(self.base.vae_scale_factor)
        channels = int(self.vae.config.latent_channels)
        shape = (count, channels, params.height // scale, params.width // scale)
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    @staticmethod
    def _picture(task: ImageTask, params: RenderParams) -> Image.Image:
        if task.init_image is None:
            raise ValueError(f"a {params.kind} render needs an init image for every task")
        return Image.frombytes("RGB", (params.width, params.height), task.init_image)

    @staticmethod
    def _mask(task: ImageTask, params: RenderParams) -> Image.Image:
        if task.mask is None:
            raise ValueError("an inpaint render needs a mask for every task")
        return Image.frombytes("L", (params.width, params.height), task.mask)

    @contextmanager
    def _model(self, name: str | None) -> Iterator[None]:
        """The batch's base model active meanwhile (loaded if need be: InvalidModel when it
        cannot be); the default again after, for chunk counts and descriptions."""
        self._active = self.models.activate(name)
        try:
            yield
        finally:
            self._active = self.models.default

    def _check_stop(self, batch: RenderBatch) -> None:
        if batch.should_stop():
            raise RenderCancelled("render cancelled: nobody waits for these images")

    @contextmanager
    def _stage(self, stage: str) -> Iterator[None]:
        synchronize(self.device)
        started = time.perf_counter()
        yield
        synchronize(self.device)
        if self.stage_observer is not None:
            self.stage_observer(stage, time.perf_counter() - started)


def full_mask(params: RenderParams) -> Image.Image:
    """A mask repainting the whole picture: an inpainting model's edit without a mask."""
    return Image.new("L", (params.width, params.height), 255)


def resize_lanczos(picture: Image.Image, width: int, height: int) -> bytes:
    """The hires fix's "Lanczos" upscaler: raw RGB bytes at the render size, as an edit's
    init image travels."""
    return picture.resize((width, height), Image.Resampling.LANCZOS).tobytes()
