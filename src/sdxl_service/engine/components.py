"""SDXL's components built offline from their configs, with random weights.

The five weighted modules, an offline CLIP tokenizer and SDXL's scheduler,
assembled into a base + refiner pair as the SDXL repos define it. The tiny
preset builds its pair with these from its narrow configs; the GPU bench
builds the full-size pair from the published ones.
"""

from __future__ import annotations

from typing import Any

from .devices import cast_module

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (ByteLevel pre-tokenizer)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def clip_vocab() -> dict[str, int]:
    """Byte-level vocabulary: every byte alone and as a word end, then BOS/EOS.

    EOS gets the highest id, as in the real CLIP vocabulary, because CLIP text
    models with a legacy `eos_token_id` pool at `input_ids.argmax()`.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def build_clip_tokenizer(pad_token: str = EOS_TOKEN) -> Any:
    """A CLIPTokenizer that needs no download; every text maps to in-vocabulary ids."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=clip_vocab(),
        merges=[],
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


def scheduler_config() -> dict[str, Any]:
    """SDXL 1.0's published EulerDiscreteScheduler config (both repos ship the same)."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "clip_sample": False,
    }


def _text_model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    # Keys of a saved transformers config.json that are not constructor arguments.
    return {
        key: value
        for key, value in config.items()
        if key not in ("architectures", "model_type") and not key.startswith("_")
    }


def build_modules(configs: dict[str, dict[str, Any]], dtype: Any = None) -> dict[str, Any]:
    """SDXL's five weighted components from their configs, randomly initialised.

    Built on torch's current default device (`with torch.device(...)`); each
    module is cast to `dtype` as soon as it exists, which keeps the float32
    peak to one module when building full-size SDXL on a GPU.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cast(module: Any) -> Any:
        return module if dtype is None else cast_module(module, dtype)

    # The order fixes which random numbers each module draws: keep it.
    return {
        "vae": cast(AutoencoderKL.from_config(configs["vae"])),
        "text_encoder": cast(
            CLIPTextModel(CLIPTextConfig(**_text_model_kwargs(configs["text_encoder"])))
        ),
        "text_encoder_2": cast(
            CLIPTextModelWithProjection(
                CLIPTextConfig(**_text_model_kwargs(configs["text_encoder_2"]))
            )
        ),
        "base_unet": cast(UNet2DConditionModel.from_config(configs["base_unet"])),
        "refiner_unet": cast(UNet2DConditionModel.from_config(configs["refiner_unet"])),
    }


def build_taesd(config: dict[str, Any] | None = None, dtype: Any = None) -> Any:
    """A randomly initialised AutoencoderTiny; without a config, madebyollin/taesdxl's.

    taesdxl's published config.json is AutoencoderTiny's defaults: 64 channels,
    (1, 3, 3, 3) encoder and (3, 3, 3, 1) decoder blocks, 4 latent channels,
    scaling_factor 1.0.
    """
    from diffusers import AutoencoderTiny

    taesd = AutoencoderTiny.from_config(config or {})
    return taesd if dtype is None else cast_module(taesd, dtype)


def assemble_pipelines(modules: dict[str, Any]) -> tuple[Any, Any]:
    """Base and refiner as the SDXL repos define them, sharing text_encoder_2 and the VAE."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    # As in the SDXL repos, the second tokenizer pads with "!" (id 0), the first with EOS.
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    base = StableDiffusionXLPipeline(
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        text_encoder_2=modules["text_encoder_2"],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=modules["base_unet"],
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config()),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=modules["vae"],
        text_encoder=None,
        text_encoder_2=modules["text_encoder_2"],
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        unet=modules["refiner_unet"],
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config()),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    return base, refiner
