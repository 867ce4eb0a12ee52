"""The latent codec: the VAE <-> UNet latent scaling written once, its inverse, and encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from sdxl_service.choices import RenderKind
from sdxl_service.engine.latents import LatentCodec
from sdxl_service.engine.tiny import vae_config
from tests.jobs import make_params

# Per-channel statistics as VAEs that declare them ship them (SDXL's does not).
LATENTS_MEAN = [0.5, -0.25, 0.125, -1.0]
LATENTS_STD = [2.0, 0.5, 1.5, 4.0]


def codec(**config: object) -> LatentCodec:
    with torch.device("meta"):
        vae = AutoencoderKL.from_config({**vae_config(), **config})
    return LatentCodec(vae, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(
    "statistics",
    [{}, {"latents_mean": LATENTS_MEAN, "latents_std": LATENTS_STD}],
    ids=["scaling_factor", "mean_and_std"],
)
def test_to_vae_then_to_unet_gives_the_latents_back(statistics: dict[str, object]) -> None:
    latent_codec = codec(**statistics)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(latent_codec.to_unet(latent_codec.to_vae(latents)), latents, atol=1e-6)
    assert torch.allclose(latent_codec.to_vae(latent_codec.to_unet(latents)), latents, atol=1e-6)


def test_scaling_factor_alone_is_a_plain_scale() -> None:
    latent_codec = codec()
    latents = torch.ones(1, 4, 2, 2)
    assert torch.equal(latent_codec.to_unet(latents), latents * 0.13025)


def test_mean_and_std_normalise_each_channel() -> None:
    latent_codec = codec(latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD, scaling_factor=1.0)
    per_channel = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1).expand(2, 4, 3, 3)
    assert torch.equal(latent_codec.to_unet(per_channel), torch.zeros(2, 4, 3, 3))


def test_the_codec_keeps_the_dtype_of_its_input() -> None:
    latent_codec = codec(latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    half = torch.ones(1, 4, 2, 2, dtype=torch.bfloat16)
    assert latent_codec.to_unet(half).dtype == latent_codec.to_vae(half).dtype == torch.bfloat16


def test_each_image_samples_the_posterior_with_its_own_generator() -> None:
    """As diffusers' img2img and inpaint pipelines draw it (`retrieve_latents`)."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
        retrieve_latents,
    )

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(vae_config())
    latent_codec = LatentCodec(vae, device="cpu", dtype=torch.float32)
    picture = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    params = make_params(kind=RenderKind.IMAGE_TO_IMAGE, steps=10, strength=0.5)
    ours = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    theirs = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    encodes = []
    hook = vae.encoder.register_forward_hook(lambda *_: encodes.append(1))
    with torch.inference_mode():
        latents = latent_codec.encode([picture.tobytes()] * 2, params, ours)
        hook.remove()
        image = VaeImageProcessor().preprocess(Image.fromarray(picture))
        expected = torch.cat([retrieve_latents(vae.encode(image), generator=one) for one in theirs])
    assert len(encodes) == 1  # one picture, two samples
    assert torch.equal(latents, expected * vae.config.scaling_factor)
    assert not torch.equal(latents[0], latents[1])
    # The generators are left where diffusers leaves them, for the noise drawn next.
    for mine, stock in zip(ours, theirs, strict=True):
        assert torch.equal(mine.get_state(), stock.get_state())
