"""Textual-inversion embeddings in the engine, on the tiny pair, with embeddings made here.

Stock diffusers is `load_textual_inversion` twice (clip_l into text_encoder, clip_g into
text_encoder_2) as its SDXL docs show, on copies of the tiny pair's text encoders and
tokenizers (it changes them for good), then the pipelines with the prompt text.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from safetensors.torch import save_file

from sdxl_service.choices import PromptSyntax, RefinerMode, RenderKind
from sdxl_service.contract.render_request import RenderParams
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.embeddings import encoder_widths
from sdxl_service.engine.prompt_syntax import Fragment
from sdxl_service.engine.prompts import CHUNK_TOKENS, prompt_embeddings, token_chunks
from sdxl_service.engine.render_batch import ImageTask, InvalidEmbedding, RenderBatch
from sdxl_service.engine.schedulers import make_scheduler
from tests.jobs import make_params

from .test_engine import LEFT_HALF, noise_picture, pixels

SIZE = 64
SEEDS = (7, 8)
PROMPT = "a photo of tinystyle, red fox"
NEGATIVE = "tinyneg, blurry"
# name -> vectors
EMBEDDINGS = {"tinystyle": 3, "tinyneg": 1}


def embedding_tensors(widths: dict[str, int], vectors: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(vectors, width, generator=generator) for key, width in widths.items()}


@pytest.fixture(scope="module")
def widths(tiny_engine: Engine) -> dict[str, int]:
    return encoder_widths(tiny_engine.base)


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory, widths: dict[str, int]) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    for seed, (name, vectors) in enumerate(EMBEDDINGS.items()):
        save_file(embedding_tensors(widths, vectors, seed), folder / f"{name}.safetensors")
    # SD 1.5's format, and SDXL's real widths (not the tiny encoders').
    save_file({"emb_params": torch.zeros(2, widths["clip_l"])}, folder / "sd15.safetensors")
    save_file(
        embedding_tensors({"clip_l": 768, "clip_g": 1280}, 1, 9), folder / "fullsize.safetensors"
    )
    return folder


@pytest.fixture(scope="module")
def engine(tiny_settings_factory, embeddings_dir: Path) -> Engine:
    return Engine.load(EngineConfig.of(tiny_settings_factory(embeddings_dir=embeddings_dir)))


@pytest.fixture(scope="module")
def stock(engine: Engine, embeddings_dir: Path) -> dict[str, Any]:
    """diffusers' pipelines over the engine's UNets and VAE, with their own text encoders and
    tokenizers holding the embeddings as load_textual_inversion puts them."""
    from safetensors.torch import load_file

    base, refiner = engine.base, engine.refiner
    encoders = {
        "text_encoder": copy.deepcopy(base.text_encoder),
        "text_encoder_2": copy.deepcopy(base.text_encoder_2),
        "tokenizer": copy.deepcopy(base.tokenizer),
        "tokenizer_2": copy.deepcopy(base.tokenizer_2),
    }
    stock_base = StableDiffusionXLPipeline(**{**base.components, **encoders})
    for name in EMBEDDINGS:
        state = load_file(embeddings_dir / f"{name}.safetensors")
        stock_base.load_textual_inversion(
            state["clip_l"],
            token=name,
            text_encoder=encoders["text_encoder"],
            tokenizer=encoders["tokenizer"],
        )
        stock_base.load_textual_inversion(
            state["clip_g"],
            token=name,
            text_encoder=encoders["text_encoder_2"],
            tokenizer=encoders["tokenizer_2"],
        )
    shared = {key: encoders[key] for key in ("text_encoder_2", "tokenizer_2")}
    refiner_parts = {**refiner.components, **shared}
    return {
        "base": stock_base,
        "base_img2img": StableDiffusionXLImg2ImgPipeline(**stock_base.components),
        "base_inpaint": StableDiffusionXLInpaintPipeline(**stock_base.components),
        "refiner": StableDiffusionXLImg2ImgPipeline(
            **refiner_parts, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        ),
        "refiner_inpaint": StableDiffusionXLInpaintPipeline(
            **refiner_parts, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        ),
    }


def render(engine: Engine, params: RenderParams, prompt: str, negative: str = "", **task: Any):
    tasks = [
        ImageTask(prompt=prompt, negative_prompt=negative, seed=seed, **task) for seed in SEEDS
    ]
    return [pixels(image) for image in engine.render(RenderBatch(params=params, tasks=tasks))]


def stock_render(
    engine: Engine,
    stock: dict[str, Any],
    params: RenderParams,
    stages: list[tuple[str, dict[str, Any]]],
    **inputs: Any,
) -> list[np.ndarray]:
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]
    n = len(SEEDS)
    latents: Any = inputs.pop("image", None)
    with torch.inference_mode():
        for name, arguments in stages:
            pipeline = stock[name]
            config = (
                engine._refiner_scheduler_config
                if "refiner" in name
                else engine._base_scheduler_config
            )
            pipeline.scheduler = make_scheduler(params.scheduler, config)
            image = {} if latents is None else {"image": latents}
            latents = pipeline(
                prompt=[PROMPT] * n,
                negative_prompt=[NEGATIVE] * n,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=generators,
                output_type="latent",
                **image,
                **inputs,
                **arguments,
            ).images
        return [pixels(decoded) for decoded in engine.latent_codec.decode(latents)]


def assert_same(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    differences = [int(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True)]
    assert differences == [0] * len(differences)


def test_conditioning_equals_diffusers_load_textual_inversion(
    engine: Engine, stock: dict[str, Any]
) -> None:
    """Bit for bit: hidden states and pooled outputs of both encoders, base and refiner."""
    vectors = engine.embeddings.load(
        [("prompt", [PROMPT]), ("negative_prompt", [NEGATIVE])], encoder_widths(engine.base)
    )
    assert sorted(vectors) == ["tinyneg", "tinystyle"]
    for ours_pipeline, theirs in ((engine.base, stock["base"]), (engine.refiner, stock["refiner"])):
        with torch.inference_mode():
            ours = prompt_embeddings(
                ours_pipeline, [PROMPT], [NEGATIVE], 5.0, PromptSyntax.A1111, 1, vectors
            )
            encoded = theirs.encode_prompt(
                prompt=PROMPT, negative_prompt=NEGATIVE, device="cpu", num_images_per_prompt=1
            )
        names = [
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
        ]
        for name, expected in zip(names, encoded, strict=True):
            assert torch.equal(ours[name], expected), name
        # The embedding moves the conditioning: without it the words are plain text.
        with torch.inference_mode():
            plain = prompt_embeddings(ours_pipeline, [PROMPT], [NEGATIVE], 5.0)
        assert not torch.equal(plain["prompt_embeds"], ours["prompt_embeds"])


def test_text_to_image_with_the_refiner_matches_stock(engine: Engine, stock: dict) -> None:
    params = make_params(num_inference_steps=10, refiner=RefinerMode.ENSEMBLE)
    expected = stock_render(
        engine,
        stock,
        params,
        [("base", {"denoising_end": 0.8}), ("refiner", {"denoising_start": 0.8})],
        width=SIZE,
        height=SIZE,
    )
    assert_same(render(engine, params, PROMPT, NEGATIVE), expected)


@pytest.mark.parametrize("kind", [RenderKind.IMAGE_TO_IMAGE, RenderKind.INPAINT])
def test_edits_with_the_refiner_match_stock(engine: Engine, stock: dict, kind: RenderKind) -> None:
    params = make_params(
        kind=kind, num_inference_steps=10, strength=0.75, refiner=RefinerMode.ENSEMBLE
    )
    picture = noise_picture(3)
    image = [Image.frombytes("RGB", (SIZE, SIZE), picture)] * len(SEEDS)
    stage = "inpaint" if kind is RenderKind.INPAINT else "img2img"
    inputs: dict[str, Any] = {"image": image}
    mask = None
    if kind is RenderKind.INPAINT:
        mask = LEFT_HALF
        mask_image = Image.frombytes("L", (SIZE, SIZE), mask)
        inputs |= {"mask_image": [mask_image] * len(SEEDS), "width": SIZE, "height": SIZE}
    refiner = "refiner_inpaint" if kind is RenderKind.INPAINT else "refiner"
    expected = stock_render(
        engine,
        stock,
        params,
        [
            (f"base_{stage}", {"strength": 0.75, "denoising_end": 0.8}),
            (refiner, {"denoising_start": 0.8}),
        ],
        **inputs,
    )
    got = render(engine, params, PROMPT, NEGATIVE, init_image=picture, mask=mask)
    if mask is not None:
        inside = np.frombuffer(mask, np.uint8).reshape(SIZE, SIZE) > 127
        got, expected = [g[inside] for g in got], [e[inside] for e in expected]
    assert_same(got, expected)


def test_prompts_naming_no_embedding_render_as_without_the_folder(
    engine: Engine, tiny_engine: Engine
) -> None:
    """A word that merely contains an embedding's name is that word; nothing of an embedding
    used before stays behind in the tokenizers or encoders."""
    params = make_params(num_inference_steps=4)
    prompt = "tinystyles and atinyneg, a red fox"
    render(engine, params, PROMPT, NEGATIVE)  # embeddings used just before
    assert_same(render(engine, params, prompt), render(tiny_engine, params, prompt))
    base = engine.base
    assert len(base.tokenizer) == len(tiny_engine.base.tokenizer)
    for encoder in (base.text_encoder, base.text_encoder_2):
        assert not encoder.get_input_embeddings()._forward_hooks


def test_weighting_syntax(engine: Engine) -> None:
    params = make_params(num_inference_steps=4, refiner=RefinerMode.NONE)
    plain = render(engine, params, "a photo of tinystyle")
    assert_same(render(engine, params, "a photo of (tinystyle:1.0)"), plain)
    weighted = render(engine, params, "a photo of (tinystyle:1.3)")
    assert max(int(np.abs(a - b).max()) for a, b in zip(weighted, plain, strict=True)) > 0


def test_an_embedding_takes_a_token_per_vector_and_stays_in_one_chunk(engine: Engine) -> None:
    tokenizer = engine.base.tokenizer
    filler = "a " * (CHUNK_TOKENS - 2)  # one token each
    assert len(tokenizer(filler, add_special_tokens=False).input_ids) == CHUNK_TOKENS - 2
    (alone,) = token_chunks(tokenizer, [Fragment(filler)], {"tinystyle": 3})
    chunks = token_chunks(tokenizer, [Fragment(filler + "tinystyle")], {"tinystyle": 3})
    assert len(chunks) == 2
    assert chunks[0].ids == alone.ids  # the 3 vectors did not fit beside 73 tokens
    assert chunks[1].embeddings == ((1, "tinystyle"),)
    assert chunks[1].ids[1:5] == [0, 0, 0, tokenizer.eos_token_id]


def test_chunk_counts_follow_the_folder(
    tiny_settings_factory, tmp_path: Path, widths: dict[str, int]
) -> None:
    """Engine._chunk_counts is cached by prompt: a file added, grown or removed still counts."""
    engine = Engine.load(EngineConfig.of(tiny_settings_factory(embeddings_dir=tmp_path)))
    params = make_params()
    task = ImageTask(prompt="longstyle " + "a " * 60, seed=1)  # 60 tokens, and the name's
    assert engine.conditioning_chunks(task, params) == 1
    path = tmp_path / "longstyle.safetensors"
    save_file(embedding_tensors(widths, 10, 1), path)
    assert engine.conditioning_chunks(task, params) == 1
    save_file(embedding_tensors(widths, 20, 1), path)
    assert engine.conditioning_chunks(task, params) == 2
    path.unlink()
    assert engine.conditioning_chunks(task, params) == 1


@pytest.mark.parametrize(
    ("prompt", "negative", "message"),
    [
        ("sd15 fox", "", "'sd15' named in prompt cannot be used: it is an SD 1.5 embedding"),
        ("fox", "fullsize", "'fullsize' named in negative_prompt cannot be used: its vectors"),
    ],
)
def test_an_unusable_embedding_is_refused_naming_the_field(
    engine: Engine, prompt: str, negative: str, message: str
) -> None:
    with pytest.raises(InvalidEmbedding, match=message):
        render(engine, make_params(), prompt, negative)
    for encoder in (engine.base.text_encoder, engine.base.text_encoder_2):
        assert not encoder.get_input_embeddings()._forward_hooks


def test_the_pooled_output_stays_at_the_end_of_the_text_with_sdxls_old_eos_id(
    engine: Engine, stock: dict[str, Any]
) -> None:
    """SDXL's real text_encoder_2 config has eos_token_id 2, for which transformers pools at
    the highest id: diffusers' added tokens move it onto the embedding, A1111's placeholder
    (and this service's) leave it at the end of the text. The tiny configs carry the real id;
    set the old one on both sides to see the documented difference."""
    vectors = engine.embeddings.load([("prompt", [PROMPT])], encoder_widths(engine.base))
    ours_encoder = engine.base.text_encoder_2.text_model
    theirs_encoder = stock["base"].text_encoder_2.text_model
    with torch.inference_mode():
        before = prompt_embeddings(engine.base, [PROMPT], [""], 5.0, embeddings=vectors)
        (_, _, theirs_before, _) = stock["base"].encode_prompt(prompt=PROMPT, device="cpu")
        saved = ours_encoder.eos_token_id, theirs_encoder.eos_token_id
        ours_encoder.eos_token_id = theirs_encoder.eos_token_id = 2
        try:
            after = prompt_embeddings(engine.base, [PROMPT], [""], 5.0, embeddings=vectors)
            (_, _, theirs_after, _) = stock["base"].encode_prompt(prompt=PROMPT, device="cpu")
        finally:
            ours_encoder.eos_token_id, theirs_encoder.eos_token_id = saved
    assert torch.equal(before["pooled_prompt_embeds"], theirs_before)
    assert torch.equal(after["pooled_prompt_embeds"], before["pooled_prompt_embeds"])
    assert not torch.equal(theirs_after, theirs_before)
