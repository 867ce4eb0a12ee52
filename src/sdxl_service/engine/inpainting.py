"""diffusers' SDXL inpaint pipeline, handed the picture as latents the engine sampled itself.

Given a picture, the stock pipeline samples two VAE posteriors with each
image's generator: the picture's (`prepare_latents`, before the noise) and the
masked picture's (`prepare_mask_latents`, after it), although a 4-channel UNet
never reads the masked picture's latents. The engine samples the first itself
(latents.py) and hands over latents, so the stock pipeline skips the second —
and every later draw from the generators (an ancestral scheduler's noise, the
refiner's) would come one draw early. `masked_picture_draws=True` makes that
draw where the stock pipeline makes it, without the encode.

An inpainting checkpoint's UNet (9 input channels) does read the masked picture's latents.
`masked_picture` encodes them where the stock pipeline does, after the noise, with the
engine's own VAE codec (the pipeline's encode would cast the shared VAE): handed the mask
as the pipeline prepared it, it returns the latents, drawn from each image's generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
    StableDiffusionXLInpaintPipeline,
)
from diffusers.utils.torch_utils import randn_tensor

from .latents import posterior_dtype

# The mask as the pipeline prepared it (n, 1, height, width) -> the masked pictures' latents.
MaskedPicture = Callable[[torch.Tensor], torch.Tensor]


def is_inpainting_unet(unet: Any) -> bool:
    """A UNet that takes latents, mask and masked picture's latents (9 channels on SDXL's 4)."""
    config = unet.config
    return int(config.in_channels) == 2 * int(config.out_channels) + 1


class InpaintPipeline(StableDiffusionXLInpaintPipeline):
    """`StableDiffusionXLInpaintPipeline` that can draw for a masked picture it is not given,
    or have the engine encode it."""

    _masked_picture_draws = False
    _masked_picture: MaskedPicture | None = None

    def __call__(
        self,
        *args: Any,
        masked_picture_draws: bool = False,
        masked_picture: MaskedPicture | None = None,
        **kwargs: Any,
    ) -> Any:
        """The stock call; `masked_picture_draws`: `image` stands for a picture, not a
        hand-over; `masked_picture`: the masked picture's latents, for a 9-channel UNet."""
        self._masked_picture_draws = masked_picture_draws
        self._masked_picture = masked_picture
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._masked_picture_draws = False
            self._masked_picture = None

    def prepare_mask_latents(
        self,
        mask: torch.Tensor,
        masked_image: torch.Tensor | None,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: Any,
        do_classifier_free_guidance: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._masked_picture is not None and masked_image is None:
            # Latents (4 channels): the stock method takes them as they are.
            masked_image = self._masked_picture(mask)
        prepared: tuple[torch.Tensor, torch.Tensor | None] = super().prepare_mask_latents(
            mask,
            masked_image,
            batch_size,
            height,
            width,
            dtype,
            device,
            generator,
            do_classifier_free_guidance,
        )
        if self._masked_picture_draws and masked_image is None:
            # The draws of `_encode_vae_image`: one posterior sample per image.
            vae = self.vae
            scale = self.vae_scale_factor
            latent = (vae.config.latent_channels, height // scale, width // scale)
            draw = {"device": vae.device, "dtype": posterior_dtype(vae)}
            if isinstance(generator, list):
                for one in generator:
                    randn_tensor((1, *latent), generator=one, **draw)
            else:
                randn_tensor((batch_size, *latent), generator=generator, **draw)
        return prepared
