"""The VAE's side of a render: raw RGB pictures to UNet latents, and latents back to images."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image

from ..choices import Switch
from ..contract.render_request import RenderParams
from .render_batch import RenderCancelled

# SDXL_VAE_TILING=auto tiles images of more pixels than this: 1536x1536, the largest the
# default SDXL_MAX_PIXELS allows, so that every size allowed by default keeps its untiled
# pixels (on any VAE: the tiny preset's 64-pixel tiles would otherwise split a 256x256
# decode, 8x slower, make bench-overhead) and only larger ones (a raised limit, a hires
# pass) pay the blending for flat memory.
AUTO_TILING_ABOVE_PIXELS = 1536 * 1536


def _never() -> bool:
    return False


def posterior_dtype(vae: Any) -> torch.dtype:
    """The dtype diffusers samples the VAE posterior in: float32 where it upcasts the VAE."""
    return torch.float32 if vae.config.force_upcast else vae.dtype


class LatentCodec:
    """Pictures <-> latents scaled as the UNets take them, over one (shared) VAE.

    The VAE's dtype is read at every call: the optimisations may cast it after
    the codec is made. `dtype` is the UNets' dtype, the one encoded latents get.
    """

    def __init__(
        self, vae: Any, *, device: str, dtype: torch.dtype, tiling: Switch = Switch.OFF
    ) -> None:
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.tiling = tiling

    def tiles(self, height: int, width: int) -> bool:
        """Whether a picture of this size is encoded and decoded in tiles (SDXL_VAE_TILING).

        Tiled, the VAE's activations are those of one tile (its config's sample_size, 1024
        pixels for SDXL's) whatever the image's size, and the tiles overlap by a quarter and
        are blended: the pixels differ a little from an untiled pass (docs/PERFORMANCE.md).
        A picture within one tile is never split, so `on` changes nothing up to 1024x1024.
        """
        if self.tiling is Switch.OFF:
            return False
        beyond_one_tile = max(height, width) > int(self.vae.tile_sample_min_size)
        if self.tiling is Switch.ON:
            return beyond_one_tile
        return beyond_one_tile and height * width > AUTO_TILING_ABOVE_PIXELS

    @contextmanager
    def _tiled(self, height: int, width: int) -> Iterator[None]:
        """diffusers' own tiling (AutoencoderKL.enable_tiling) for one call. The VAE is
        shared, but every encode and decode of a render runs on the render thread, one
        after the other."""
        if not self.tiles(height, width):
            yield
            return
        self.vae.enable_tiling()
        try:
            yield
        finally:
            self.vae.disable_tiling()

    def to_unet(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the UNets' latent space, in the dtype and device of `latents`."""
        config = self.vae.config
        latents_mean = getattr(config, "latents_mean", None)
        latents_std = getattr(config, "latents_std", None)
        scaling_factor = float(config.scaling_factor)
        if latents_mean is None or latents_std is None:
            return latents * scaling_factor
        mean, std = self._channel_stats(latents, latents_mean, latents_std)
        return (latents - mean) * scaling_factor / std

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_unet`."""
        config = self.vae.config
        latents_mean = getattr(config, "latents_mean", None)
        latents_std = getattr(config, "latents_std", None)
        scaling_factor = float(config.scaling_factor)
        if latents_mean is None or latents_std is None:
            return latents / scaling_factor
        mean, std = self._channel_stats(latents, latents_mean, latents_std)
        return latents * std / scaling_factor + mean

    @staticmethod
    def _channel_stats(
        latents: torch.Tensor, mean: Any, std: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def per_channel(values: Any) -> torch.Tensor:
            tensor = torch.tensor(values, device=latents.device, dtype=latents.dtype)
            return tensor.view(1, -1, 1, 1)

        return per_channel(mean), per_channel(std)

    def encode(
        self,
        images: Sequence[bytes | None],
        params: RenderParams,
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        """Init images (raw RGB, params' width x height) -> latents as the UNets take them.

        Each image's latents are a sample of the VAE posterior drawn with its
        own generator, as diffusers' img2img and inpaint pipelines draw it
        before the noise: the same seed gives the stock pipelines' edit.
        Done here, not by the pipelines: their encode casts the shared VAE to
        the UNet dtype after upcasting it (undoing a float32 VAE kept for fp16).
        A picture is encoded once (the n images of one request share it, not
        their seeds); only the sampling is per image.
        """
        posteriors: dict[bytes, Any] = {}
        latents = []
        for rgb, generator in zip(images, generators, strict=True):
            if rgb is None:
                raise ValueError(f"a {params.kind} render needs an init image for every task")
            if rgb not in posteriors:
                posteriors[rgb] = self._posterior(rgb, params)
            # Scaled in the UNets' dtype, as the pipelines scale it.
            sample = posteriors[rgb].sample(generator).to(self.dtype)
            latents.append(self.to_unet(sample))
        return torch.cat(latents)

    def encode_masked(
        self,
        images: Sequence[bytes | None],
        masks: torch.Tensor,
        params: RenderParams,
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        """The masked pictures an inpainting UNet is conditioned on, as latents: each picture
        with its mask's repainted part (mask >= 0.5) set to 0 (mid grey), as diffusers'
        inpaint pipeline masks it (`init_image * (mask < 0.5)`), then sampled with its
        image's generator. `masks`: one per image, (n, 1, height, width), 0 or 1, as the
        pipeline's mask processor makes them."""
        latents = []
        for index, (rgb, generator) in enumerate(zip(images, generators, strict=True)):
            if rgb is None:
                raise ValueError(f"a {params.kind} render needs an init image for every task")
            keep = masks[index : index + 1].to(self.device) < 0.5
            posterior = self._posterior_of(self._pixels(rgb, params) * keep, params)
            latents.append(self.to_unet(posterior.sample(generator).to(self.dtype)))
        return torch.cat(latents)

    def _pixels(self, rgb: bytes, params: RenderParams) -> torch.Tensor:
        pixels = torch.frombuffer(bytearray(rgb), dtype=torch.uint8)
        # diffusers' VaeImageProcessor: x / 255 * 2 - 1 in float32, in the same
        # memory layout (the layout picks the VAE's conv kernels).
        pixels = pixels.view(1, params.height, params.width, 3).permute(0, 3, 1, 2)
        return (pixels.to(device=self.device, dtype=torch.float32) / 255.0) * 2.0 - 1.0

    def _posterior(self, rgb: bytes, params: RenderParams) -> Any:
        return self._posterior_of(self._pixels(rgb, params), params)

    def _posterior_of(self, sample: torch.Tensor, params: RenderParams) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        vae = self.vae
        with self._tiled(params.height, params.width):
            parameters = vae.encode(sample.to(vae.dtype)).latent_dist.parameters
        return DiagonalGaussianDistribution(parameters.to(posterior_dtype(vae)))

    def decode(
        self, latents: torch.Tensor, should_stop: Callable[[], bool] = _never
    ) -> list[Image.Image]:
        """RGB images, one per latent; `should_stop` is polled between images."""
        vae = self.vae
        latents = self.to_vae(latents.to(device=self.device, dtype=vae.dtype))
        images: list[Image.Image] = []
        # One image at a time: decode at 1024 px is conv-bound already at batch 1,
        # its float32 activations for a batch of 8 would take gigabytes, and a
        # cancelled batch stops between images.
        for one in latents.split(1):
            if images and should_stop():
                raise RenderCancelled("render cancelled: nobody waits for these images")
            with self._tiled(*self.image_size(one)):
                pixels = vae.decode(one, return_dict=False)[0]
            pixels = (pixels.float() / 2 + 0.5).clamp(0, 1)
            rgb = (pixels[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
            images.append(Image.fromarray(rgb))
        return images

    def image_size(self, latents: torch.Tensor) -> tuple[int, int]:
        """(height, width) in pixels of the images these latents decode to."""
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(latents.shape[-2]) * scale, int(latents.shape[-1]) * scale
