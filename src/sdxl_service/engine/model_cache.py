"""The base models a render worker holds: the default one, and those of SDXL_MODELS_DIR,
loaded on first use and kept while recently used.

Every model renders with the one refiner of the default pair (SDXL 1.0's refiner refines any
SDXL base's latents: it conditions on its own text encoder, the default's bigG). What a model
shares with the default base is decided by the weights, not the names: after a model loads,
each of its text encoders and its VAE that holds exactly the default's tensors (compared
tensor by tensor, on the device) is dropped for the default's module, so a fine-tune of the
UNet alone (the usual case) costs only its UNet's memory. Comparing a hash of the files would
miss a folder against a single file of the same weights and a hub default. With SDXL_VAE set,
every model uses that VAE (the operator chose it for all), and theirs is not loaded.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..lora_catalog import LoraCatalog
from ..metrics import ServiceMetrics
from ..model_catalog import ModelCatalog, ModelEntry
from .config import EngineConfig
from .devices import free_memory
from .latents import LatentCodec
from .loading import edit_pipelines, load_base_pipeline
from .loras import LoraAdapters
from .optimisations import optimise_modules
from .render_batch import InvalidModel

logger = logging.getLogger(__name__)

# The modules a model may share with the default base when their weights are equal.
SHAREABLE = ("text_encoder", "text_encoder_2", "vae")


@dataclass(eq=False)
class BaseModelPipelines:
    """One base model and what is built over it: its edit pipelines, LoRAs and VAE codec."""

    name: str | None  # None: the default base (SDXL_BASE_MODEL)
    base: Any
    img2img: Any
    inpaint: Any
    loras: LoraAdapters
    latent_codec: LatentCodec
    scheduler_config: dict[str, Any]
    shared: tuple[str, ...] = ()  # modules that are the default's own
    stamp: tuple[int, int] = (0, 0)  # the file's when loaded: a replaced file reloads


def same_weights(module: Any, other: Any) -> bool:
    """Whether two modules hold equal tensors (in `other`'s dtype: the default VAE may have
    been upcast to float32, exactly, from the same half-precision weights)."""
    if type(module) is not type(other):
        return False
    mine, theirs = module.state_dict(), other.state_dict()
    if mine.keys() != theirs.keys():
        return False
    with torch.no_grad():
        return all(
            mine[key].shape == theirs[key].shape
            and torch.equal(mine[key].to(theirs[key].device, theirs[key].dtype), theirs[key])
            for key in mine
        )


def _adapter_prefix(name: str) -> str:
    return f"m{hashlib.sha1(name.encode()).hexdigest()[:8]}_"


def _for_client(message: str, entry: ModelEntry) -> str:
    # The single-file loader names the variable and the path it was given; the client picked
    # a model by name and is told nothing of the server's files.
    named = f"SDXL_BASE_MODEL={str(entry.path)!r}"
    return message.replace(named, f"model '{entry.name}'").replace(str(entry.path), entry.name)


class ModelCache:
    """The default base model and up to `config.model_cache` of SDXL_MODELS_DIR's, least
    recently used unloaded first. Called from the render thread only, like the Engine."""

    def __init__(
        self,
        default: BaseModelPipelines,
        refiner: Any,
        config: EngineConfig,
        *,
        device: str,
        dtype: torch.dtype,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.default = default
        self.refiner = refiner
        self.config = config
        self.device = device
        self.dtype = dtype
        self.metrics = metrics
        self.capacity = config.model_cache
        self.catalog = ModelCatalog(config.models_dir)
        self._resident: OrderedDict[str, BaseModelPipelines] = OrderedDict()
        # The last model rendered: its LoRAs are switched off before another renders, as
        # they may sit in text encoders the two share.
        self._current: BaseModelPipelines = default
        # Loads that failed, by name: (the file's stamp, the reason), so a broken file is
        # not loaded again for every request until it is replaced.
        self._failed: dict[str, tuple[tuple[int, int], str]] = {}

    def resident(self) -> list[str]:
        """Names of the loaded models of SDXL_MODELS_DIR, least recently used first."""
        return list(self._resident)

    def describe(self) -> dict[str, Any]:
        return {"models_loaded": self.resident(), "model_cache": self.capacity}

    def activate(self, name: str | None) -> BaseModelPipelines:
        """The model to render with (loaded if need be), the previous one's LoRAs off.

        InvalidModel, with nothing of the model left loaded, when it cannot be loaded.
        """
        model = self.default if name is None else self._get(name)
        if model is not self._current:
            self._current.loras.activate(())
            self._current = model
        return model

    def unload(self, name: str) -> None:
        """The model out of memory: its adapters out of shared modules, its modules freed."""
        model = self._resident.pop(name)
        model.loras.unload_all()
        if self._current is model:
            self._current = self.default
        del model
        self._free_memory()
        self._count_resident()
        logger.info("model %s unloaded", name)

    # --- loading --------------------------------------------------------------

    def _get(self, name: str) -> BaseModelPipelines:
        entry = self.catalog.find(name)
        if entry is None:
            raise InvalidModel(f"model '{name}' is not in the models folder (any more)")
        if entry.problem is not None:
            raise InvalidModel(entry.problem)
        loaded = self._resident.get(name)
        if loaded is not None and loaded.stamp == entry.stamp:
            self._resident.move_to_end(name)
            return loaded
        if loaded is not None:  # the file was replaced since
            self.unload(name)
        failed = self._failed.get(name)
        if failed is not None and failed[0] == entry.stamp:
            raise InvalidModel(failed[1])
        # Room first: the least recently used goes before the new one takes its memory.
        while len(self._resident) >= self.capacity:
            self.unload(next(iter(self._resident)))
        return self._load(entry)

    def _load(self, entry: ModelEntry) -> BaseModelPipelines:
        started = time.perf_counter()
        problem: str | None = None
        try:
            model = self._build(entry)
        except torch.OutOfMemoryError:
            self._free_memory()
            raise  # the Engine answers it as out of memory
        except InvalidModel as error:
            problem = str(error)
        except Exception as error:  # diffusers, safetensors, transformers: their own types
            logger.warning("model %s failed to load", entry.name, exc_info=True)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            problem = _for_client(
                f"model '{entry.name}' cannot be loaded: {type(error).__name__}: {first_line}",
                entry,
            )
        if problem is not None:
            # Out of the except block: its traceback no longer pins the half-loaded modules.
            self._free_memory()
            self._failed[entry.name] = (entry.stamp, problem)
            self._count_load("failed")
            raise InvalidModel(problem)
        seconds = time.perf_counter() - started
        self._failed.pop(entry.name, None)
        self._resident[entry.name] = model
        self._count_load("ok", seconds)
        self._count_resident()
        logger.info(
            "model %s loaded in %.1f s (shares %s with the default)",
            entry.name,
            seconds,
            ", ".join(model.shared) or "nothing",
        )
        return model

    def _build(self, entry: ModelEntry) -> BaseModelPipelines:
        default = self.default.base
        given = {"vae": default.vae} if self.config.vae else {}
        base = load_base_pipeline(
            str(entry.path),
            dtype=self.dtype,
            variant=self.config.variant,
            cache_dir=self.config.cache_dir,
            **given,
        )
        base.to(self.device)
        self._check_fits(entry, base)
        shared = list(given)
        for name in SHAREABLE:
            if name not in given and same_weights(getattr(base, name), getattr(default, name)):
                setattr(base, name, getattr(default, name))
                shared.append(name)
        # What was dropped for the default's goes now, before anything else is allocated.
        gc.collect()
        own_vae = "vae" not in shared
        optimise_modules(
            [base.unet],
            base.vae if own_vae else None,
            self.config,
            device=self.device,
            dtype=self.dtype,
        )
        base.set_progress_bar_config(disable=True)
        img2img, inpaint, _ = edit_pipelines(base, self.refiner)
        codec = (
            LatentCodec(
                base.vae, device=self.device, dtype=self.dtype, tiling=self.config.vae_tiling
            )
            if own_vae
            else self.default.latent_codec
        )
        loras = LoraAdapters(
            base,
            LoraCatalog(self.config.lora_folder),
            capacity=self.config.lora_cache,
            device=self.device,
            metrics=self.metrics,
            adapter_prefix=_adapter_prefix(entry.name),
        )
        return BaseModelPipelines(
            name=entry.name,
            base=base,
            img2img=img2img,
            inpaint=inpaint,
            loras=loras,
            latent_codec=codec,
            scheduler_config=dict(base.scheduler.config),
            shared=tuple(shared),
            stamp=entry.stamp,
        )

    def _check_fits(self, entry: ModelEntry, base: Any) -> None:
        """The model must hand the refiner latents it knows, at the size the service renders."""
        default = self.default.base

        def native(pipeline: Any) -> int:
            return int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)

        def unet_latents(pipeline: Any) -> int:
            # What the UNet denoises (its output): an inpainting UNet takes more channels in.
            return int(pipeline.unet.config.out_channels)

        checks = {
            "native resolution": (native(base), native(default)),
            "UNet latent channels": (unet_latents(base), unet_latents(default)),
            "latent channels": (
                int(base.vae.config.latent_channels),
                int(default.vae.config.latent_channels),
            ),
        }
        for what, (its, wanted) in checks.items():
            if its != wanted:
                raise InvalidModel(
                    f"model '{entry.name}' does not fit the service's refiner: its {what} is "
                    f"{its}, the default model's {wanted}"
                )

    def _free_memory(self) -> None:
        free_memory(self.device)

    def _count_load(self, outcome: str, seconds: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.count_model_load(outcome, seconds)

    def _count_resident(self) -> None:
        if self.metrics is not None:
            self.metrics.set_models_resident(len(self._resident))
