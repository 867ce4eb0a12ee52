"""The latent codec: the VAE <-> UNet latent scaling written once, and its inverse."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from sdxl_service.engine.latents import LatentCodec
from sdxl_service.tiny import vae_config

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
