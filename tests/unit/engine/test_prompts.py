"""Long and weighted prompts on the tiny pair: chunks, A1111's emphasis, diffusers' parity.

The tiny tokenizer is byte-level: every character of a word is a token, so
75 characters of one word are 75 tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_service.choices import PromptSyntax
from sdxl_service.contract.render_request import (
    GenerationOutcome,
    OutcomeStatus,
    RenderParams,
    RenderRequest,
)
from sdxl_service.engine import Engine
from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.prompt_syntax import ChunkBreak, Fragment
from sdxl_service.engine.prompts import (
    CHUNK_TOKENS,
    chunk_count,
    image_chunk_counts,
    prompt_embeddings,
    token_chunks,
)
from sdxl_service.engine.render_batch import ImageTask, RenderBatch
from sdxl_service.render.batcher import Batcher
from sdxl_service.settings import Settings
from tests.jobs import make_params

EMBEDDINGS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
LONG = "a red fox in the snow, " + "x" * 80 + " under a starry sky"  # two chunks


def params(**overrides: object) -> RenderParams:
    return make_params(**overrides)


def render(engine: Engine, prompt: str, negative: str = "", seed: int = 7) -> np.ndarray:
    task = ImageTask(prompt=prompt, negative_prompt=negative, seed=seed)
    return pixels(engine.render(RenderBatch(params=params(), tasks=[task]))[0])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def embed(
    pipeline: object,
    prompts: list[str],
    negatives: list[str] | None = None,
    syntax: PromptSyntax = PromptSyntax.A1111,
) -> dict[str, Any]:
    """Guided embeddings; no negative prompts unless given."""
    negatives = negatives if negatives is not None else [""] * len(prompts)
    return prompt_embeddings(pipeline, prompts, negatives, 5.0, syntax)


# --- tokens into chunks -------------------------------------------------------


def test_75_tokens_are_one_chunk_and_76_two(tiny_engine: Engine) -> None:
    tokenizer = tiny_engine.base.tokenizer_2
    words = "x " * CHUNK_TOKENS  # "x" as a word: one token
    (chunk,) = token_chunks(tokenizer, [Fragment(words)])
    assert chunk.ids == tokenizer(words, padding="max_length", max_length=77).input_ids
    first, second = token_chunks(tokenizer, [Fragment(words + "x")])
    assert first.ids == chunk.ids
    assert second.ids[:3] == [tokenizer.bos_token_id, *first.ids[1:2], tokenizer.eos_token_id]
    assert second.ids[3:] == [tokenizer.pad_token_id] * 74
    assert chunk_count(tiny_engine.base, "x " * 151, PromptSyntax.A1111) == 3


def test_break_starts_a_chunk_and_weights_follow_their_tokens(tiny_engine: Engine) -> None:
    tokenizer = tiny_engine.base.tokenizer
    first, second = token_chunks(
        tokenizer, [Fragment("ab"), Fragment("c", 1.5), ChunkBreak(), Fragment("d")]
    )
    assert first.weights[:5] == [1.0, 1.0, 1.0, 1.5, 1.0]
    assert len(first.ids) == len(second.ids) == 77
    assert second.ids[:3] == tokenizer("d").input_ids
    assert chunk_count(tiny_engine.base, "cat BREAK dog", PromptSyntax.NONE) == 1


# --- parity with diffusers ----------------------------------------------------


@pytest.mark.parametrize("stage", ["base", "refiner"])
def test_short_plain_prompts_are_bit_identical_to_encode_prompt(
    tiny_engine: Engine, stage: str
) -> None:
    pipeline = getattr(tiny_engine, stage)
    prompts = ["a red fox in the snow", "y" * CHUNK_TOKENS, "photo: a cat, 16:9"]
    negatives = ["blurry", "text", "low quality"]
    ours = embed(pipeline, prompts, negatives)
    stock = pipeline.encode_prompt(
        prompt=prompts,
        device=pipeline._execution_device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=negatives,
    )
    for name, tensor in zip(EMBEDDINGS, stock, strict=True):
        assert torch.equal(ours[name], tensor), name


def test_empty_negatives_are_zeros_for_the_base_and_encoded_for_the_refiner(
    tiny_engine: Engine,
) -> None:
    base = embed(tiny_engine.base, [LONG])
    assert base["negative_prompt_embeds"].shape == (1, 154, 64)
    assert not base["negative_prompt_embeds"].any()
    assert not base["negative_pooled_prompt_embeds"].any()
    refiner = embed(tiny_engine.refiner, ["a cat"])
    stock = tiny_engine.refiner.encode_prompt(prompt=["a cat"], negative_prompt=[""])
    assert torch.equal(refiner["negative_prompt_embeds"], stock[1])


# --- long prompts -------------------------------------------------------------


@pytest.mark.parametrize("stage", ["base", "refiner"])
def test_long_prompts_are_chunks_concatenated_pooled_from_the_first(
    tiny_engine: Engine, stage: str
) -> None:
    pipeline = getattr(tiny_engine, stage)
    head, tail = "z " * 75, "a cat on a mat"
    whole = embed(pipeline, [head + tail])
    first, second = embed(pipeline, [head]), embed(pipeline, [tail])
    embeds = whole["prompt_embeds"]
    assert embeds.shape[1] == 154
    assert torch.equal(embeds[:, :77], first["prompt_embeds"])
    assert torch.equal(embeds[:, 77:], second["prompt_embeds"])
    assert torch.equal(whole["pooled_prompt_embeds"], first["pooled_prompt_embeds"])


def test_a_short_prompt_is_padded_with_empty_chunks_to_its_long_negative(
    tiny_engine: Engine,
) -> None:
    padded = embed(tiny_engine.base, ["a cat"], [LONG])
    assert padded["prompt_embeds"].shape == padded["negative_prompt_embeds"].shape
    alone, empty = embed(tiny_engine.base, ["a cat"]), embed(tiny_engine.base, [""])
    assert torch.equal(padded["prompt_embeds"][:, :77], alone["prompt_embeds"])
    assert torch.equal(padded["prompt_embeds"][:, 77:], empty["prompt_embeds"])


def test_words_after_token_77_change_the_image(tiny_engine: Engine) -> None:
    head = "a red fox in the snow, " + "x " * 60
    assert len(tiny_engine.base.tokenizer(head, add_special_tokens=False).input_ids) >= 77
    one, other = render(tiny_engine, head + " a castle"), render(tiny_engine, head + " a boat")
    assert np.abs(one - other).mean() > 0.5


def test_a_2000_token_prompt_renders(tiny_engine: Engine) -> None:
    prompt = " ".join(["a red fox in the snow"] * 120)  # 16 tokens each, 1,920 + 120 spaces
    assert len(prompt) <= Settings().max_prompt_chars
    assert chunk_count(tiny_engine.base, prompt, PromptSyntax.A1111) >= 2000 // CHUNK_TOKENS
    image = render(tiny_engine, prompt, negative="blurry")
    assert image.shape == (64, 64, 3)


# --- emphasis -----------------------------------------------------------------


def test_weights_scale_tokens_and_restore_each_chunks_mean(tiny_engine: Engine) -> None:
    """A1111's method, per encoder: z * w, then z * (original mean / new mean)."""
    base = tiny_engine.base
    plain = embed(base, ["a cat sat"])["prompt_embeds"][0]
    weighted = embed(base, ["a (cat:1.5) sat"])["prompt_embeds"][0]
    weights = torch.ones(77, 1)
    weights[2:5] = 1.5  # BOS, "a", then c-a-t
    split = base.text_encoder.config.hidden_size
    expected = []
    for z in (plain[:, :split], plain[:, split:]):
        scaled = z * weights
        expected.append(scaled * (z.mean() / scaled.mean()))
    assert torch.allclose(weighted, torch.cat(expected, dim=-1), atol=1e-6)
    pooled = embed(base, ["a (cat:1.5) sat"])["pooled_prompt_embeds"]
    assert torch.equal(pooled, embed(base, ["a cat sat"])["pooled_prompt_embeds"])


def test_emphasis_changes_the_image_and_a_weight_of_one_does_not(tiny_engine: Engine) -> None:
    plain = render(tiny_engine, "a cat in a garden")
    # Random weights condition weakly on text: a small but certain difference.
    assert np.abs(render(tiny_engine, "a (cat:1.5) in a garden") - plain).mean() > 0.1
    assert np.array_equal(render(tiny_engine, "a (cat:1.0) in a garden"), plain)


def test_syntax_none_takes_brackets_literally(
    tiny_engine: Engine,
    tiny_settings_factory: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = tiny_engine.base
    literal = embed(base, ["(cat:1.5)"], syntax=PromptSyntax.NONE)["prompt_embeds"]
    escaped = embed(base, ["\\(cat:1.5\\)"])["prompt_embeds"]
    assert torch.equal(literal, escaped)
    assert not torch.equal(literal, embed(base, ["(cat:1.5)"])["prompt_embeds"])
    # The engine reads the setting.
    emphasised, escaped_image = (
        render(tiny_engine, "(cat:1.5)"),
        render(tiny_engine, "\\(cat:1.5\\)"),
    )
    config = EngineConfig.of(tiny_settings_factory(prompt_syntax="none"))
    monkeypatch.setattr(tiny_engine, "config", config)
    literal_image = render(tiny_engine, "(cat:1.5)")
    assert np.array_equal(literal_image, escaped_image)
    assert not np.array_equal(literal_image, emphasised)


# --- batching -----------------------------------------------------------------


MIXED = [
    ImageTask(prompt=LONG, negative_prompt="blurry", seed=1),
    ImageTask(prompt="a lighthouse at dusk", negative_prompt="", seed=2),
    ImageTask(prompt="a bowl of ramen", negative_prompt=LONG, seed=3),
    ImageTask(prompt="a (red:1.3) kite", negative_prompt="text", seed=4),
]


def test_each_image_counts_the_chunks_of_its_longer_text(tiny_engine: Engine) -> None:
    counts = [tiny_engine.conditioning_chunks(task, params()) for task in MIXED]
    assert counts == [2, 1, 2, 1]


def test_the_engine_refuses_a_batch_that_mixes_chunk_counts(tiny_engine: Engine) -> None:
    """Padding the shorter prompts would change their images: the batch policy splits."""
    with pytest.raises(ValueError, match=r"mixes conditioning of \[1, 2\] 75-token chunks"):
        tiny_engine.render(RenderBatch(params=params(), tasks=MIXED))


def test_prompts_of_different_lengths_batch_like_each_alone(tiny_engine: Engine) -> None:
    """Queued together, they render in one call per chunk count, each image as it is alone."""
    calls: list[list[int]] = []

    def render(batch: RenderBatch) -> list[Image.Image]:
        calls.append([task.seed for task in batch.tasks])
        return tiny_engine.render(batch)

    async def submit_all() -> list[GenerationOutcome]:
        batcher = Batcher(
            render,
            max_batch_images=8,
            batch_wait_ms=0,
            chunk_count=tiny_engine.conditioning_chunks,
        )
        try:
            jobs = [
                RenderRequest(
                    request_id=f"mixed-{task.seed}",
                    params=params(),
                    prompt=task.prompt,
                    negative_prompt=task.negative_prompt,
                    seeds=[task.seed],
                )
                for task in MIXED
            ]
            return await asyncio.gather(*(batcher.submit(job) for job in jobs))
        finally:
            await batcher.stop()

    outcomes = asyncio.run(submit_all())
    # The first job's image may go alone before the others are queued; never mixed.
    assert sorted(seed for call in calls for seed in call) == [1, 2, 3, 4]
    assert all(
        len({tiny_engine.conditioning_chunks(MIXED[s - 1], params()) for s in call}) == 1
        for call in calls
    )
    for task, outcome in zip(MIXED, outcomes, strict=True):
        assert outcome.status is OutcomeStatus.OK, outcome.message
        [image] = outcome.images
        alone = tiny_engine.render(RenderBatch(params=params(), tasks=[task]))[0]
        batched = np.frombuffer(image.rgb, np.uint8).reshape(image.height, image.width, 3)
        assert np.allclose(batched.astype(int), pixels(alone), atol=2), task


def test_without_guidance_a_long_negative_neither_pads_nor_splits(tiny_engine: Engine) -> None:
    counts = image_chunk_counts(
        tiny_engine.base, ["a cat", "a dog"], [LONG, ""], 1.0, PromptSyntax.A1111
    )
    assert counts == [1, 1]
    embeddings = prompt_embeddings(tiny_engine.refiner, [LONG], [LONG], 1.0)
    assert embeddings["prompt_embeds"].shape[1] == 154
    assert embeddings["negative_prompt_embeds"] is None
    task = ImageTask(prompt=LONG, negative_prompt=LONG, seed=3)
    (image,) = tiny_engine.render(RenderBatch(params=params(guidance_scale=1.0), tasks=[task]))
    assert image.size == (64, 64)
