"""Write the diffusers configs a single-file SDXL checkpoint is loaded with, offline.

A single `.safetensors` checkpoint (the original layout AUTOMATIC1111, ComfyUI and Civitai use)
holds weights only; diffusers' `from_single_file` needs the configs of a diffusers folder beside
it. These are the configs of stabilityai/stable-diffusion-xl-{base,refiner}-1.0: the component
configs of bench/configs (the published ones), SDXL's scheduler (engine.components), the
pipelines' model_index.json and the tokenizers' settings; the tokenizer vocabulary itself is
scripts/make_clip_bpe.py's.

    .venv/bin/python scripts/make_sdxl_configs.py

writes src/sdxl_service/engine/sdxl_configs/{base,inpaint,refiner}/. `inpaint/` is the base's
with the UNet of diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (the base's, initialised
from it, with 9 input channels: latents, mask, masked picture's latents), for inpainting
checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdxl_service.engine.components import scheduler_config

REPO = Path(__file__).resolve().parents[1]
BENCH_CONFIGS = REPO / "bench" / "configs"
OUT = REPO / "src" / "sdxl_service" / "engine" / "sdxl_configs"
DIFFUSERS_VERSION = "0.19.0.dev0"  # what the stock repos' configs were saved with


def _tokenizer_config(pad_token: str) -> dict[str, Any]:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }


def _scheduler() -> dict[str, Any]:
    return {"_class_name": "EulerDiscreteScheduler", **scheduler_config()}


def _bench(name: str) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((BENCH_CONFIGS / f"{name}.json").read_text())
    return config


def _model_index(pipeline: str, **entries: Any) -> dict[str, Any]:
    return {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION, **entries}


def folders() -> dict[str, dict[str, dict[str, Any]]]:
    """{pipeline folder: {relative path: JSON}}."""
    components = {
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    base = {
        "model_index.json": _model_index(
            "StableDiffusionXLPipeline",
            force_zeros_for_empty_prompt=True,
            text_encoder=["transformers", "CLIPTextModel"],
            tokenizer=["transformers", "CLIPTokenizer"],
            unet=["diffusers", "UNet2DConditionModel"],
            **components,
        ),
        "scheduler/scheduler_config.json": _scheduler(),
        "unet/config.json": _bench("base_unet"),
        "vae/config.json": _bench("vae"),
        "text_encoder/config.json": _bench("text_encoder"),
        "text_encoder_2/config.json": _bench("text_encoder_2"),
        "tokenizer/tokenizer_config.json": _tokenizer_config("<|endoftext|>"),
        "tokenizer_2/tokenizer_config.json": _tokenizer_config("!"),
    }
    inpaint = base | {"unet/config.json": _bench("base_unet") | {"in_channels": 9}}
    return {
        "base": base,
        "inpaint": inpaint,
        "refiner": {
            "model_index.json": _model_index(
                "StableDiffusionXLImg2ImgPipeline",
                force_zeros_for_empty_prompt=False,
                requires_aesthetics_score=True,
                text_encoder=[None, None],
                tokenizer=[None, None],
                unet=["diffusers", "UNet2DConditionModel"],
                **components,
            ),
            "scheduler/scheduler_config.json": _scheduler(),
            "unet/config.json": _bench("refiner_unet"),
            "vae/config.json": _bench("vae"),
            "text_encoder_2/config.json": _bench("text_encoder_2"),
            "tokenizer_2/tokenizer_config.json": _tokenizer_config("!"),
        },
    }


def main() -> None:
    for folder, files in folders().items():
        for name, content in files.items():
            path = OUT / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=2) + "\n")
            print(path.relative_to(REPO))


if __name__ == "__main__":
    main()
