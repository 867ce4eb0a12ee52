"""ControlNet models of SDXL_CONTROLNET_DIR: loaded on first use, kept in a least-recently-used
list, and run through diffusers' ControlNet pipelines built over the base's own modules.

A batch with ControlNet units runs its base stage through `StableDiffusionXLControlNet*`
(or the `ControlNetUnion*` pipelines when its models are Union ones), constructed per batch
from the base pipeline's components: no module is copied, and a batch without units never
builds one. The refiner has none: the control acts on the base's share of the steps.

diffusers' ControlNet img2img pipelines have no `denoising_end`; for the refiner ensemble
their loop is interrupted (their own `_interrupt` flag, set from the step callback) once the
base has run the steps diffusers' plain img2img keeps before `denoising_end`
(handover.ensemble_split counts them the same way). `control_guidance_start`/`_end` stay
shares of the whole schedule, as in the text-to-image and inpaint ControlNet pipelines,
which cut their timesteps after computing them.

The inpaint pipelines are handed the pictures, not the engine's latents (they read the
picture's size from what they are given, so latents cannot stand for it), and encode them as
stock diffusers does: the picture and the masked picture, each a draw from its generator.
Their encode casts the shared VAE back to the UNets' dtype after upcasting it; it is put
back to its own dtype after (a float32 VAE kept beside an fp16 UNet stays float32).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..choices import RenderKind
from ..contract.render_request import ControlNetParams, RenderParams
from ..controlnet_catalog import WEIGHTS_FILES, ControlNetCatalog, ControlNetFile
from ..metrics import ServiceMetrics
from .handover import ensemble_split
from .render_batch import ImageTask, InvalidControlNet
from .resident_models import ResidentModels, file_stamp


@dataclass(frozen=True)
class LoadedControlNet:
    model: Any
    union: bool


def load_controlnet(entry: ControlNetFile, unet: Any, device: str, dtype: torch.dtype) -> Any:
    """The ControlNet of `entry` on `device` in `dtype`, in eval mode. A single file takes its
    config from `unet` (as `ControlNetModel.from_unet` makes one: the layout of every SDXL
    ControlNet published as one file); ValueError when its weights do not fit."""
    from diffusers import ControlNetModel, ControlNetUnionModel
    from safetensors.torch import load_file

    kind = ControlNetUnionModel if entry.union else ControlNetModel
    if entry.format == "diffusers":
        variant = "fp16" if entry.weights.name == WEIGHTS_FILES[1] else None
        model = kind.from_pretrained(
            str(entry.path), torch_dtype=dtype, variant=variant, local_files_only=True
        )
    else:
        state = load_file(str(entry.path))
        with torch.device("meta"):
            model = kind.from_unet(unet, load_weights_from_unet=False)
            if entry.union:
                # The Union transformer's sizes are the file's (xinsir's: 320 channels, and
                # 6 control types, 8 in ProMax); its head count (8) is not in the shapes.
                types, channels = state["task_embedding"].shape
                sizes = {
                    "num_control_type": types,
                    "num_trans_channel": channels,
                    "num_proj_channel": state["spatial_ch_projs.weight"].shape[0],
                }
                # Without the config's own `_` keys: `_use_default_values` would drop `sizes`.
                config = {k: v for k, v in model.config.items() if not k.startswith("_")}
                model = kind.from_config({**config, **sizes})
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise ValueError(f"its weights do not fit the base model's layout: {exc}") from None
    _check_fits(model, unet)
    return model.to(device=device, dtype=dtype).eval()


def _check_fits(model: Any, unet: Any) -> None:
    for key in ("cross_attention_dim", "block_out_channels"):
        mine, base = model.config.get(key), unet.config.get(key)
        if (list(mine) if isinstance(mine, (list, tuple)) else mine) != (
            list(base) if isinstance(base, (list, tuple)) else base
        ):
            raise ValueError(f"it is made for another model ({key} {mine}, the base has {base})")


class ControlNetModels:
    """The ControlNets loaded on one device, the most recently used `capacity` of them.

    Called from the render thread only, like the rest of the Engine.
    """

    def __init__(
        self,
        folder: Path | None,
        *,
        device: str,
        dtype: torch.dtype,
        capacity: int,
        metrics: ServiceMetrics | None = None,
        optimise: Callable[[Any], object] | None = None,
    ) -> None:
        self.catalog = ControlNetCatalog(folder)
        # The settings' speed-ups (optimisations.optimise_module), once per load: the list
        # keeps the module as they left it.
        self._optimise = optimise
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self._resident: ResidentModels[LoadedControlNet] = ResidentModels(
            "ControlNet",
            device,
            # The parameters' storage goes now, not when the last reference does.
            release=lambda _, loaded: loaded.model.to("meta"),
            count_load=metrics.count_controlnet_load if metrics else None,
            count_resident=metrics.set_controlnets_resident if metrics else None,
        )

    def loaded(self) -> list[str]:
        """Names of the loaded ControlNets, least recently used first."""
        return self._resident.names()

    def describe(self) -> dict[str, Any]:
        return {"controlnets_loaded": self.loaded(), "control_cache": self.capacity}

    def models(self, names: Sequence[str], unet: Any) -> list[LoadedControlNet]:
        """The ControlNets `names` (repeats allowed), loaded if need be; InvalidControlNet, with
        nothing of that one left loaded, when one cannot be."""
        wanted = list(dict.fromkeys(names))
        loaded = {name: self._ensure_loaded(name, unet) for name in wanted}
        self._resident.evict(keep=set(wanted), capacity=self.capacity)
        return [loaded[name] for name in names]

    def _ensure_loaded(self, name: str, unet: Any) -> LoadedControlNet:
        entry = self._resident.entry(self.catalog, name, InvalidControlNet)
        stamp = file_stamp(entry.weights)
        if stamp is None:
            raise InvalidControlNet(f"ControlNet '{name}' has no weights (any more)")
        return self._resident.get(name, stamp, lambda: self._load(entry, unet))

    def _load(self, entry: ControlNetFile, unet: Any) -> LoadedControlNet:
        try:
            model = load_controlnet(entry, unet, self.device, self.dtype)
        except torch.OutOfMemoryError:
            raise  # the Engine answers it as out of memory
        except Exception as exc:
            raise InvalidControlNet(f"ControlNet '{entry.name}' cannot be used: {exc}") from None
        if self._optimise is not None:
            try:
                self._optimise(model)
            except BaseException:
                # Not the file's fault (out of memory, most likely: raised as it is); its
                # memory goes now, not when the error's traceback does.
                model.to("meta")
                raise
        return LoadedControlNet(model=model, union=entry.union)

    # --- the base stage through a ControlNet pipeline ------------------------

    def stage(
        self,
        base: Any,
        params: RenderParams,
        tasks: Sequence[ImageTask],
        call: dict[str, Any],
        scheduler_config: dict[str, Any],
    ) -> tuple[Any, dict[str, Any]]:
        """The ControlNet pipeline over `base`'s modules for `params`' units, and `call` (the
        keyword arguments of the base pipeline's call) made its arguments."""
        units = params.controlnets
        if base.unet.config.in_channels != 4:
            # The HTTP process refuses these (api/serving.py); a model changed since lands here.
            raise InvalidControlNet("ControlNet units take no inpainting checkpoint")
        nets = self.models([unit.name for unit in units], base.unet)
        union = nets[0].union
        if any(net.union != union for net in nets):
            raise InvalidControlNet("a render's ControlNets are all Union models or none is")
        kind = RenderKind(params.kind)
        pipeline = control_pipeline(base, kind, union, [net.model for net in nets])
        call = dict(call)
        call.pop("masked_picture_draws", None)
        call |= control_arguments(pipeline, units, tasks, params, union=union)
        if kind is RenderKind.IMAGE_TO_IMAGE:
            denoising_end = call.pop("denoising_end", None)
            if denoising_end is not None:
                base_steps, _ = ensemble_split(
                    params.num_inference_steps,
                    denoising_end,
                    params.scheduler,
                    scheduler_config,
                    strength=params.strength,
                    schedule_type=params.schedule_type,
                )
                call["callback_on_step_end"] = stop_after(base_steps, call["callback_on_step_end"])
        return pipeline, call


def stop_after(steps: int, callback: Callable[..., dict]) -> Callable[..., dict]:
    """`callback`, which also ends the pipeline's loop after `steps` steps: diffusers' own
    interrupt flag, checked at the top of each step (the steps after it run nothing)."""
    done = 0

    def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        nonlocal done
        done += 1
        if done >= steps:
            pipeline._interrupt = True
        return callback(pipeline, step, timestep, tensors)

    return on_step_end


def control_pipeline(base: Any, kind: RenderKind, union: bool, models: Sequence[Any]) -> Any:
    """diffusers' ControlNet pipeline of `kind` over `base`'s modules with `models` (one, or
    a Multi model of several, the same model possibly twice)."""
    from diffusers import MultiControlNetModel
    from diffusers.models.controlnets.multicontrolnet_union import MultiControlNetUnionModel

    classes = _pipeline_classes()
    cls = classes[(kind, union)]
    multi = MultiControlNetUnionModel if union else MultiControlNetModel
    controlnet = models[0] if len(models) == 1 else multi(list(models))
    accepted = inspect.signature(cls).parameters
    flags = {
        "force_zeros_for_empty_prompt": base.config.force_zeros_for_empty_prompt,
        "requires_aesthetics_score": base.config.get("requires_aesthetics_score", False),
        "add_watermarker": False,
    }
    components = {k: v for k, v in base.components.items() if k in accepted}
    pipeline = cls(
        **components,
        controlnet=controlnet,
        **{k: v for k, v in flags.items() if k in accepted},
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _pipeline_classes() -> dict[tuple[RenderKind, bool], Any]:
    from diffusers import (
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLControlNetUnionImg2ImgPipeline,
        StableDiffusionXLControlNetUnionPipeline,
    )

    inpaint, union_inpaint = _inpaint_classes()
    return {
        (RenderKind.TEXT_TO_IMAGE, False): StableDiffusionXLControlNetPipeline,
        (RenderKind.IMAGE_TO_IMAGE, False): StableDiffusionXLControlNetImg2ImgPipeline,
        (RenderKind.INPAINT, False): inpaint,
        (RenderKind.TEXT_TO_IMAGE, True): StableDiffusionXLControlNetUnionPipeline,
        (RenderKind.IMAGE_TO_IMAGE, True): StableDiffusionXLControlNetUnionImg2ImgPipeline,
        (RenderKind.INPAINT, True): union_inpaint,
    }


class _KeepsVaeDtype:
    """Puts the (shared) VAE back to its own dtype after the stock encode cast it."""

    vae: Any

    def _encode_vae_image(self, image: torch.Tensor, generator: Any) -> Any:
        dtype = self.vae.dtype
        try:
            return super()._encode_vae_image(image, generator)  # type: ignore[misc]
        finally:
            self.vae.to(dtype=dtype)


def _inpaint_classes() -> tuple[type, type]:
    from diffusers import (
        StableDiffusionXLControlNetInpaintPipeline,
        StableDiffusionXLControlNetUnionInpaintPipeline,
    )

    return _inpaint_class(StableDiffusionXLControlNetInpaintPipeline), _inpaint_class(
        StableDiffusionXLControlNetUnionInpaintPipeline
    )


@functools.cache
def _inpaint_class(stock: type) -> type:
    return type(stock.__name__.removeprefix("StableDiffusionXL"), (_KeepsVaeDtype, stock), {})


def control_arguments(
    pipeline: Any,
    units: Sequence[ControlNetParams],
    tasks: Sequence[ImageTask],
    params: RenderParams,
    *,
    union: bool,
) -> dict[str, Any]:
    """The ControlNet arguments of the pipeline's call: each unit's control images (one per
    image of the batch), scales, guidance start and end, and a Union model's modes."""
    size = (params.width, params.height)
    pictures = [
        [Image.frombytes("RGB", size, task.control_images[index]) for task in tasks]
        for index in range(len(units))
    ]
    single = len(units) == 1
    if single and not union:
        # A list of pictures is one image per prompt: what stock callers pass.
        images: Any = pictures[0]
    else:
        # Several units take one tensor each (diffusers refuses nested lists), made by the
        # pipeline's own control-image processor as it makes one from pictures.
        images = [
            pipeline.control_image_processor.preprocess(
                unit_pictures, height=params.height, width=params.width
            )
            for unit_pictures in pictures
        ]
    arguments: dict[str, Any] = {
        "control_image" if "control_image" in _call_parameters(pipeline) else "image": images,
        "controlnet_conditioning_scale": (
            float(units[0].scale) if single else [float(unit.scale) for unit in units]
        ),
        "control_guidance_start": (
            float(units[0].start) if single else [float(unit.start) for unit in units]
        ),
        "control_guidance_end": float(units[0].end) if single else [float(u.end) for u in units],
    }
    if union:
        arguments["control_mode"] = [unit.mode for unit in units]
    return arguments


def _call_parameters(pipeline: Any) -> Any:
    return inspect.signature(type(pipeline).__call__).parameters
