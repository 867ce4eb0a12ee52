"""LoRA adapters on the base pipeline: loaded by name, kept while used, switched per batch.

diffusers' PEFT backend injects each adapter's layers into the base UNet and
the text encoders the file has weights for (`load_lora_weights` reads kohya /
A1111 and diffusers / PEFT files alike). The layers stay; what changes from
batch to batch is which adapters are active and at what scale
(`set_adapters`), or that LoRA is off altogether (`disable_lora`). A disabled
PEFT layer returns its base layer's output untouched, so a batch without
LoRA renders exactly the image it rendered before any adapter was loaded.

The refiner runs without LoRA: its UNet gets no adapter (a file's `refiner.`
weights are not applied), and its text encoder, `text_encoder_2`, is the
base's own module, so the adapters on it are switched off for the refiner
stage (`refiner_scope`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..contract.render_request import LoraWeight
from ..lora_catalog import LoraCatalog, LoraFile
from ..metrics import ServiceMetrics
from .render_batch import InvalidLora
from .resident_models import ResidentModels, file_stamp

logger = logging.getLogger(__name__)

ADAPTER_PREFIX = "lora_"
# Components of the base pipeline a LoRA file can have layers for.
BASE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def adapter_name(name: str) -> str:
    """A PEFT adapter name for LoRA `name`: PEFT keeps adapters in ModuleDicts,
    whose keys may not hold dots; the digest keeps `a.b` and `a_b` apart."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{ADAPTER_PREFIX}{safe}_{digest}"


class LoraAdapters:
    """The LoRAs loaded into one base pipeline, the most recently used `capacity` of them.

    Called from the render thread only, like the rest of the Engine.
    """

    def __init__(
        self,
        base: Any,
        catalog: LoraCatalog,
        *,
        capacity: int,
        device: str,
        metrics: ServiceMetrics | None = None,
        adapter_prefix: str = "",
    ) -> None:
        self.base = base
        # Per base model: the models of SDXL_MODELS_DIR share text encoders with the default
        # where the weights are equal, and PEFT keeps one adapter of a name per module.
        self.adapter_prefix = adapter_prefix
        self.catalog = catalog
        self.capacity = capacity
        # By LoRA name, its PEFT adapter's name.
        self._resident: ResidentModels[str] = ResidentModels(
            "LoRA",
            device,
            release=lambda _, adapter: self._delete_adapter(adapter),
            count_load=metrics.count_lora_load if metrics else None,
            count_hit=metrics.count_lora_cache_hit if metrics else None,
        )
        # Once any adapter was injected, PEFT layers stay in the modules (empty
        # after a delete) and must be switched off for batches without LoRA.
        self._has_layers = False
        self._enabled = False

    def loaded(self) -> list[str]:
        """Names of the loaded LoRAs, least recently used first."""
        return self._resident.names()

    def describe(self) -> dict[str, Any]:
        return {"loras_loaded": self.loaded(), "lora_cache": self.capacity}

    def activate(self, loras: Sequence[LoraWeight]) -> None:
        """Make exactly `loras` active at their scales (none: LoRA off); loads what is missing.

        Raises InvalidLora, with nothing of that LoRA left loaded, when one
        cannot be applied.
        """
        adapters = [(self._ensure_loaded(lora.name), lora.scale) for lora in loras]
        self._resident.evict(keep={lora.name for lora in loras}, capacity=self.capacity)
        # A zero scale adds nothing: leaving it out keeps such a render the
        # no-LoRA image bit for bit, without multiplying by zero.
        active = [(adapter, scale) for adapter, scale in adapters if scale != 0]
        if active:
            self.base.enable_lora()
            self.base.set_adapters(
                [adapter for adapter, _ in active],
                adapter_weights=[scale for _, scale in active],
            )
        elif self._has_layers:
            self.base.disable_lora()
        self._enabled = bool(active)

    @contextmanager
    def refiner_scope(self) -> Iterator[None]:
        """LoRA off in `text_encoder_2`, which the refiner shares with the base, meanwhile."""
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
        )

        if not self._enabled:
            yield
            return
        encoder = self.base.text_encoder_2
        disable_lora_for_text_encoder(encoder)
        try:
            yield
        finally:
            enable_lora_for_text_encoder(encoder)

    # --- loading --------------------------------------------------------------

    def _ensure_loaded(self, name: str) -> str:
        entry = self._resident.entry(self.catalog, name, InvalidLora)
        stamp = file_stamp(entry.path)
        if stamp is None:
            raise InvalidLora(f"LoRA '{name}' is not in the LoRA folder (any more)")
        return self._resident.get(name, stamp, lambda: self._load(entry))

    def _load(self, entry: LoraFile) -> str:
        from safetensors.torch import load_file

        adapter = self.adapter_prefix + adapter_name(entry.name)
        not_sdxl = f"LoRA '{entry.name}' is not an SDXL LoRA this service can load"
        try:
            state_dict = load_file(str(entry.path))
        except Exception as exc:  # damaged or truncated: safetensors' own error types
            raise InvalidLora(f"{not_sdxl}: its file cannot be read") from exc
        self._has_layers = True
        try:
            self.base.load_lora_weights(state_dict, adapter_name=adapter)
            layers = self._count_layers(adapter)
            if layers == 0:
                raise ValueError("no layer of the SDXL base matches its weights")
        except Exception as exc:
            # Wrong shapes (an SD 1.5 LoRA) fail after some layers were injected.
            self._delete_adapter(adapter)
            if isinstance(exc, torch.OutOfMemoryError):
                raise  # the Engine answers it as out of memory
            raise InvalidLora(f"{not_sdxl}: its weights do not fit SDXL's layers") from exc
        logger.info("LoRA %s: %d layers", entry.name, layers)
        return adapter

    def _count_layers(self, adapter: str) -> int:
        from peft.tuners.lora import LoraLayer

        return sum(
            1
            for component in BASE_COMPONENTS
            for module in getattr(self.base, component).modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A
        )

    def unload_all(self) -> None:
        """Every adapter out of the modules (those shared with other models included), before
        the base model is unloaded."""
        for name in self._resident.names():
            self._resident.unload(name)
        if self._has_layers:
            self.base.disable_lora()
        self._enabled = False

    def _delete_adapter(self, adapter: str) -> None:
        """Every trace of `adapter` in the base's modules, however far its load got."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        for component in BASE_COMPONENTS:
            module = getattr(self.base, component)
            delete_adapter_layers(module, adapter)
            config = getattr(module, "peft_config", None)
            if isinstance(config, dict):
                config.pop(adapter, None)
