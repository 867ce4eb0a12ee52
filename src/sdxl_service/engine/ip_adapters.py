"""IP-Adapters on the base UNet: loaded by name with their image encoders, kept while used
(least recently used unloaded past SDXL_CONTROL_CACHE), put on the UNet for one batch.

diffusers' `load_ip_adapter` replaces every attention processor of the UNet and sets its
`encoder_hid_proj` for good, one adapter set at a time. Here each adapter is converted once by
diffusers' own converters (`_convert_ip_adapter_attn_to_diffusers`,
`_convert_ip_adapter_image_proj_to_diffusers`), kept apart, and a batch that names adapters gets
the cross-attention processors and the projection diffusers would have built for that set, for
that batch only: afterwards the UNet's own processors and `encoder_hid_proj` are back, so a
batch without IP-Adapters runs exactly the modules it ran before any adapter was loaded. The
self-attention processors are never touched (diffusers builds fresh ones of the same class).

The images are encoded here, as diffusers' `encode_image` and `prepare_ip_adapter_image_embeds`
do, once per request's pictures however many images the request makes, and handed to the
pipeline as `ip_adapter_image_embeds` with one row per image of the batch (each its own
request's pictures; see `image_embeds`). Each adapter has its own image encoder (diffusers
holds one per pipeline); adapters sharing an encoder folder share one loaded copy.

The refiner's UNet gets no adapter: with the refiner, the adapter acts on the base's share.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..contract.render_request import IpAdapterWeight, RgbPicture
from ..ip_adapter_catalog import ENCODER_WEIGHTS, IpAdapterCatalog, IpAdapterFile
from ..metrics import ServiceMetrics
from .render_batch import ImageTask, InvalidIpAdapter
from .resident_models import ResidentModels, file_stamp


@dataclass
class LoadedIpAdapter:
    encoder: Path
    uses_hidden_states: bool
    # Per cross-attention layer (`...attn2.processor`), the adapter's processor: its
    # to_k_ip / to_v_ip for this adapter alone.
    processors: dict[str, Any]
    projection: torch.nn.Module


@dataclass
class ImageEncoder:
    model: Any  # CLIPVisionModelWithProjection
    processor: Any  # CLIPImageProcessor, as diffusers makes it for the encoder
    users: set[str] = field(default_factory=set)


class IpAdapterModels:
    """The IP-Adapters of SDXL_IP_ADAPTER_DIR a render worker holds, the most recently used
    `capacity` of them. Called from the render thread only, like the rest of the Engine."""

    def __init__(
        self,
        folder: Path | None,
        *,
        capacity: int,
        device: str,
        dtype: torch.dtype,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.catalog = IpAdapterCatalog(folder)
        self.capacity = capacity
        self.device = device
        self.dtype = dtype
        self._resident: ResidentModels[LoadedIpAdapter] = ResidentModels(
            "IP-Adapter",
            device,
            release=self._release,
            count_load=metrics.count_ip_adapter_load if metrics else None,
            count_resident=metrics.set_ip_adapters_resident if metrics else None,
        )
        self._encoders: dict[Path, ImageEncoder] = {}
        # The scope's encoded pictures by (adapter, id of the pictures' tuple): a hires fix's
        # second pass reuses its first's.
        self._encoded: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # Per UNet, its attention modules by processor name: a batch swaps the cross-attention
        # ones' processors in place (set_attn_processor walks every module of the UNet twice:
        # 37 ms a batch for SDXL's on 2 CPU cores, against microseconds for 70 assignments).
        self._attentions: weakref.WeakKeyDictionary[Any, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def loaded(self) -> list[str]:
        """Names of the loaded adapters, least recently used first."""
        return self._resident.names()

    def describe(self) -> dict[str, Any]:
        return {"ip_adapters_loaded": self.loaded(), "control_cache": self.capacity}

    @contextmanager
    def scope(self, unet: Any, adapters: Sequence[IpAdapterWeight]) -> Iterator[None]:
        """`adapters` on `unet` at their scales meanwhile (none: nothing changes); loads what
        is missing (InvalidIpAdapter when one cannot be loaded, nothing of it left loaded)."""
        if not adapters:
            yield
            return
        loaded = [self._ensure_loaded(adapter.name, unet) for adapter in adapters]
        self._resident.evict(keep={adapter.name for adapter in adapters}, capacity=self.capacity)
        attentions = self._cross_attentions(unet)
        own = {name: attention.processor for name, attention in attentions.items()}
        projection, projection_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
        swapped = _cross_attention(loaded, [adapter.scale for adapter in adapters])
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        try:
            for name, processor in swapped.items():
                attentions[name].set_processor(processor)
            unet.encoder_hid_proj = MultiIPAdapterImageProjection(
                [one.projection for one in loaded]
            )
            unet.config.encoder_hid_dim_type = "ip_image_proj"
            yield
        finally:
            self._encoded.clear()
            unet.encoder_hid_proj = projection
            unet.config.encoder_hid_dim_type = projection_type
            for name, processor in own.items():
                attentions[name].set_processor(processor)

    @contextmanager
    def image_embeds(
        self,
        pipeline: Any,
        adapters: Sequence[IpAdapterWeight],
        tasks: Sequence[ImageTask],
        guidance: bool,
    ) -> Iterator[dict[str, Any]]:
        """The pipeline call's arguments for the batch's adapters (none without): its
        `ip_adapter_image_embeds`, one row per image, each its own request's pictures.

        diffusers' pipelines take `ip_adapter_image_embeds` per prompt and repeat them for
        every image of the call (`prepare_ip_adapter_image_embeds` tiles them batch-size
        times); given one row per image, the rows would be tiled too, and the IP-Adapter
        processor would fold the surplus rows into each image's image tokens. So the
        pipeline's `prepare_ip_adapter_image_embeds` answers these rows as they are
        meanwhile: what it would have made of one request's pictures, for each image."""
        if not adapters:
            yield {}
            return
        embeds = self.embeddings(adapters, tasks, guidance)
        pipeline.prepare_ip_adapter_image_embeds = lambda *_, **__: embeds
        try:
            yield {"ip_adapter_image_embeds": embeds}
        finally:
            del pipeline.prepare_ip_adapter_image_embeds

    def _cross_attentions(self, unet: Any) -> dict[str, Any]:
        """The UNet's cross-attention modules by their processor's name (`...attn2.processor`),
        as `attn_processors` names them; the UNet's own, before any projection is set."""
        found = self._attentions.get(unet)
        if found is None:
            found = {
                f"{name}.processor": module
                for name, module in unet.named_modules()
                if name.endswith("attn2") and hasattr(module, "set_processor")
            }
            self._attentions[unet] = found
        return found

    def embeddings(
        self, adapters: Sequence[IpAdapterWeight], tasks: Sequence[ImageTask], guidance: bool
    ) -> list[torch.Tensor]:
        """diffusers' `ip_adapter_image_embeds` for the batch: per adapter, one row per task
        ([negatives, positives] with classifier-free guidance). Each task's pictures are
        encoded once however many tasks share them (the images of one job do)."""
        embeddings = []
        for index, adapter in enumerate(adapters):
            loaded = self._resident[adapter.name]
            positives, negatives = [], []
            for task in tasks:
                pictures = task.ip_adapter_images[index]
                key = (adapter.name, id(pictures))
                if key not in self._encoded:
                    self._encoded[key] = self._encode(loaded, pictures)
                positive, negative = self._encoded[key]
                positives.append(positive)
                negatives.append(negative)
            rows = negatives + positives if guidance else positives
            embeddings.append(torch.cat(rows, dim=0))
        return embeddings

    def _encode(
        self, loaded: LoadedIpAdapter, pictures: Sequence[RgbPicture]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' `encode_image(pictures, device, 1, output_hidden_states)`, each of its
        two results with the leading adapter-batch axis `prepare_ip_adapter_image_embeds`
        adds."""
        from PIL import Image

        encoder = self._encoders[loaded.encoder]
        images = [
            Image.frombytes("RGB", (picture.width, picture.height), picture.rgb)
            for picture in pictures
        ]
        pixels = encoder.processor(images, return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if loaded.uses_hidden_states:
            positive = encoder.model(pixels, output_hidden_states=True).hidden_states[-2]
            negative = encoder.model(
                torch.zeros_like(pixels), output_hidden_states=True
            ).hidden_states[-2]
        else:
            positive = encoder.model(pixels).image_embeds
            negative = torch.zeros_like(positive)
        return positive[None, :], negative[None, :]

    # --- loading -------------------------------------------------------------

    def _ensure_loaded(self, name: str, unet: Any) -> LoadedIpAdapter:
        entry = self._resident.entry(
            self.catalog, name, InvalidIpAdapter, problem_counts_as_failed=False
        )
        stamp = file_stamp(entry.path)
        if stamp is None:
            raise InvalidIpAdapter(f"IP-Adapter '{name}' is not in the IP-Adapter folder")
        return self._resident.get(name, stamp, lambda: self._load(entry, unet))

    def _load(self, entry: IpAdapterFile, unet: Any) -> LoadedIpAdapter:
        from safetensors import safe_open

        assert entry.encoder is not None  # a usable entry has its encoder
        try:
            weights: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
            # As diffusers' load_ip_adapter reads a .safetensors file.
            with safe_open(str(entry.path), framework="pt", device="cpu") as tensors:
                for key in tensors.keys():  # noqa: SIM118 (safe_open is no mapping)
                    part, _, rest = key.partition(".")
                    if part in weights:
                        weights[part][rest] = tensors.get_tensor(key)
        except Exception as exc:
            raise InvalidIpAdapter(
                f"IP-Adapter '{entry.name}' cannot be used: its file cannot be read"
            ) from exc
        try:
            # low_cpu_mem_usage=False: the weights are loaded into real modules at once
            # (load_state_dict checks every shape against this UNet).
            converted = unet._convert_ip_adapter_attn_to_diffusers(
                [weights], low_cpu_mem_usage=False
            )
            projection = unet._convert_ip_adapter_image_proj_to_diffusers(
                weights["image_proj"], low_cpu_mem_usage=False
            )
        except Exception as exc:
            raise InvalidIpAdapter(
                f"IP-Adapter '{entry.name}' cannot be used: its weights do not fit this "
                "base model's UNet"
            ) from exc
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        processors = {
            name: processor.to(device=self.device, dtype=self.dtype)
            for name, processor in converted.items()
            if isinstance(processor, IPAdapterAttnProcessor2_0)
        }
        projection = projection.to(device=self.device, dtype=self.dtype)
        self._ensure_encoder(entry)
        self._encoders[entry.encoder].users.add(entry.name)
        return LoadedIpAdapter(
            encoder=entry.encoder,
            uses_hidden_states=entry.uses_hidden_states,
            processors=processors,
            projection=projection,
        )

    def _ensure_encoder(self, entry: IpAdapterFile) -> None:
        assert entry.encoder is not None
        if entry.encoder in self._encoders:
            return
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        try:
            model = CLIPVisionModelWithProjection.from_pretrained(
                entry.encoder, dtype=self.dtype, local_files_only=True, use_safetensors=True
            )
        except Exception as exc:
            raise InvalidIpAdapter(
                f"IP-Adapter '{entry.name}' cannot be used: its image encoder "
                f"({entry.encoder.parent.name}/{entry.encoder.name}/{ENCODER_WEIGHTS}) cannot be "
                "loaded"
            ) from exc
        encoder: Any = model  # transformers' typing of .to() does not take a device
        encoder = encoder.to(self.device).eval()
        size = encoder.config.image_size
        # As diffusers' load_ip_adapter makes the pipeline's feature_extractor.
        processor = CLIPImageProcessor(size=size, crop_size=size)
        self._encoders[entry.encoder] = ImageEncoder(model=encoder, processor=processor)

    def _release(self, name: str, loaded: LoadedIpAdapter) -> None:
        """Its image encoder goes with the last adapter using it."""
        encoder = self._encoders[loaded.encoder]
        encoder.users.discard(name)
        if not encoder.users:
            del self._encoders[loaded.encoder]


def _cross_attention(loaded: Sequence[LoadedIpAdapter], scales: Sequence[float]) -> dict[str, Any]:
    """The cross-attention processors diffusers builds for this adapter set: per layer, the
    adapters' to_k_ip / to_v_ip in order, their token counts and scales."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    if len(loaded) == 1:
        # The adapter's own processors, at this batch's scale.
        for processor in loaded[0].processors.values():
            processor.scale = [scales[0]]
        return dict(loaded[0].processors)
    combined = {}
    for name, first in loaded[0].processors.items():
        parts = [one.processors[name] for one in loaded]
        # On the meta device: its own layers are replaced by the adapters' at once.
        with torch.device("meta"):
            processor = IPAdapterAttnProcessor2_0(
                hidden_size=first.hidden_size,
                cross_attention_dim=first.cross_attention_dim,
                num_tokens=[part.num_tokens[0] for part in parts],
                scale=list(scales),
            )
        processor.to_k_ip = torch.nn.ModuleList([part.to_k_ip[0] for part in parts])
        processor.to_v_ip = torch.nn.ModuleList([part.to_v_ip[0] for part in parts])
        combined[name] = processor
    return combined
