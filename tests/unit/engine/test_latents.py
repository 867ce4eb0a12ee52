"""The latent codec: the VAE <-> UNet latent scaling written once, its inverse, and encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from sdxl_service.choices import RenderKind, Switch
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
    params = make_params(kind=RenderKind.IMAGE_TO_IMAGE, num_inference_steps=10, strength=0.5)
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


# --- SDXL_VAE_TILING ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tiling", "side", "tiled"),
    [
        # The tiny VAE's tile is 64 px (its sample_size), SDXL's 1024.
        (Switch.OFF, 512, False),
        (Switch.ON, 64, False),  # one tile: never split
        (Switch.ON, 72, True),
        # auto: above 1536x1536 pixels whatever the tile (256x256 split in 64-pixel tiles
        # made the tiny preset's decode 8x slower).
        (Switch.AUTO, 256, False),
        (Switch.AUTO, 1536, False),
        (Switch.AUTO, 1544, True),
    ],
)
def test_which_sizes_are_tiled(tiling: Switch, side: int, tiled: bool) -> None:
    latent_codec = codec()
    latent_codec.tiling = tiling
    assert latent_codec.vae.tile_sample_min_size == 64
    assert latent_codec.tiles(side, side) is tiled


def test_auto_tiling_starts_above_1536x1536_for_sdxl() -> None:
    latent_codec = codec(sample_size=1024)
    latent_codec.tiling = Switch.AUTO
    assert not latent_codec.tiles(1536, 1536)
    assert latent_codec.tiles(1536, 1544) and latent_codec.tiles(2048, 2048)
    assert not latent_codec.tiles(1024, 2048)  # 2 MP: under 1536^2


def decoder_inputs(vae: AutoencoderKL) -> tuple[list[tuple[int, ...]], object]:
    seen: list[tuple[int, ...]] = []
    hook = vae.decoder.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape))
    return seen, hook


def test_a_tiled_decode_is_diffusers_tiled_decode_in_tiles_of_one_tile_at_most() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(vae_config()).eval()
    latent_codec = LatentCodec(vae, device="cpu", dtype=torch.float32, tiling=Switch.ON)
    latents = torch.randn(1, 4, 24, 20, generator=torch.Generator().manual_seed(1))
    seen, hook = decoder_inputs(vae)
    with torch.inference_mode():
        [image] = latent_codec.decode(latents)
        hook.remove()
        vae.enable_tiling()
        expected = vae.decode(latent_codec.to_vae(latents), return_dict=False)[0]
        vae.disable_tiling()
        untiled = vae.decode(latent_codec.to_vae(latents), return_dict=False)[0]
    assert image.size == (160, 192)
    # Every decoder call saw one tile (8 latents a side here, 128 for SDXL) or less: the
    # activations' size does not grow with the image.
    assert len(seen) > 1 and all(max(shape[-2:]) <= 8 for shape in seen)
    # The shared VAE is left untiled for whatever decodes next.
    assert vae.use_tiling is False

    def rgb(pixels: torch.Tensor) -> np.ndarray:
        scaled = ((pixels[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255).round()
        return scaled.to(torch.uint8).numpy()

    assert np.array_equal(np.asarray(image), rgb(expected))
    assert not np.array_equal(np.asarray(image), rgb(untiled))


def test_an_untiled_size_decodes_in_one_call() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(vae_config()).eval()
    latent_codec = LatentCodec(vae, device="cpu", dtype=torch.float32, tiling=Switch.AUTO)
    seen, hook = decoder_inputs(vae)
    with torch.inference_mode():
        [image] = latent_codec.decode(torch.randn(1, 4, 32, 32))
    hook.remove()
    assert image.size == (256, 256) and len(seen) == 1  # four tiny tiles' worth, one call


def test_a_large_edit_encodes_in_tiles() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(vae_config()).eval()
    latent_codec = LatentCodec(vae, device="cpu", dtype=torch.float32, tiling=Switch.ON)
    picture = np.random.default_rng(0).integers(0, 256, (160, 128, 3), np.uint8)
    params = make_params(kind=RenderKind.IMAGE_TO_IMAGE, width=128, height=160, strength=0.5)
    seen: list[tuple[int, ...]] = []
    hook = vae.encoder.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape))
    with torch.inference_mode():
        latents = latent_codec.encode([picture.tobytes()], params, [torch.Generator()])
    hook.remove()
    assert latents.shape == (1, 4, 20, 16)
    assert len(seen) > 1 and all(max(shape[-2:]) <= 64 for shape in seen)
    assert vae.use_tiling is False
