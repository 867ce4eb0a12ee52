"""Text conditioning for SDXL base and refiner: long prompts in 75-token chunks, A1111 emphasis.

diffusers' `encode_prompt` truncates at 77 tokens. Here each prompt is cut
into chunks of 75 tokens (a new one at every `BREAK`), each chunk is encoded
alone as BOS + 75 tokens + EOS + padding, and the chunks' penultimate hidden
states are concatenated along the sequence axis; the pooled embedding is the
first chunk's. A token weighted w (A1111's emphasis) has its hidden state
multiplied by w, and the chunk is then scaled back to its original mean.
That is AUTOMATIC1111's method, per encoder, chunk and image.

A prompt of one chunk with no emphasis takes exactly diffusers' path: the
same ids (BOS + tokens + EOS + the tokenizer's pad), the same batched
encoder call, no arithmetic on the result, so its tensors are bit-identical
to `encode_prompt` and default images stay stock diffusers'.

Why by hand and not compel (2.5.1, made for weighted SDXL prompts): its
parser reads its own syntax (`word+`, `(word)1.3`, `.blend()`), neither
A1111's brackets, `[word]` nor `BREAK`; it weights by lerping from the empty
prompt's embedding and downweights by blending with a masked prompt, not by
A1111's scale-and-restore-mean, so weighted prompts would not render as they
do in A1111; and it pads the whole token sequence rather than encoding A1111's
per-chunk BOS/EOS. What remains, tokenizing and stacking encoder calls, is
the short code below.

Chunks are cut at exactly 75 tokens: A1111's optional backtracking to a
nearby comma is not done.

A textual-inversion embedding a fragment names (embedding_catalog.find_uses)
takes one placeholder token per vector, all in one chunk (the next one when
they do not fit), weighted as its fragment, as A1111's `tokenize_line` has it;
engine/embeddings.py puts the vectors in while the chunk is encoded. With no
embedding named, the ids and the calls are the same as without any.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import get_module_execution_device

from ..choices import PromptSyntax
from ..embedding_catalog import EmbeddingUse, find_uses
from .embeddings import EmbeddingVectors, encoder_key, vectors_placed
from .prompt_syntax import Fragment, PromptPart, parse_prompt

CHUNK_TOKENS = 75  # CLIP's 77 positions less BOS and EOS


@dataclass(frozen=True)
class TokenChunk:
    """One encoder call's worth of a prompt: 77 ids and a weight for each."""

    ids: list[int]
    weights: list[float]
    # Textual-inversion embeddings in it: (position of its first vector, name).
    embeddings: tuple[tuple[int, str], ...] = ()

    @property
    def emphasised(self) -> bool:
        return any(weight != 1.0 for weight in self.weights)


# The id of an embedding vector's token, A1111's: its token embedding is replaced
# (engine/embeddings.py), and a low id keeps the pooled output at the end of the text.
EMBEDDING_PLACEHOLDER = 0


def _pieces(text: str, sizes: Mapping[str, int]) -> list[str | EmbeddingUse]:
    """A fragment's text cut around the embeddings it names."""
    pieces: list[str | EmbeddingUse] = []
    start = 0
    for use in find_uses(text, sizes) if sizes else ():
        pieces += [text[start : use.start], use]
        start = use.end
    pieces.append(text[start:])
    return pieces


def token_chunks(
    tokenizer: Any, parts: list[PromptPart], sizes: Mapping[str, int] | None = None
) -> list[TokenChunk]:
    """`parts` as chunks of BOS + up to 75 tokens + EOS + padding, as A1111 cuts them; an
    embedding of `sizes` (its vectors by name) takes as many tokens as it has vectors, all in
    one chunk (the next when it does not fit)."""
    sizes = sizes or {}
    pieces = [_pieces(part.text, sizes) if isinstance(part, Fragment) else part for part in parts]
    texts = [
        piece
        for fragment in pieces
        if isinstance(fragment, list)
        for piece in fragment
        if isinstance(piece, str)
    ]
    # verbose=False: the token count past 77 is expected here, not worth a warning.
    tokenized = iter(tokenizer(texts, add_special_tokens=False, verbose=False).input_ids)
    chunks: list[TokenChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    embeddings: list[tuple[int, str]] = []

    def close_chunk() -> None:
        padding = CHUNK_TOKENS - len(ids)
        chunks.append(
            TokenChunk(
                ids=[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
                + [tokenizer.pad_token_id] * padding,
                weights=[1.0, *weights, 1.0] + [1.0] * padding,
                embeddings=tuple(embeddings),
            )
        )
        ids.clear()
        weights.clear()
        embeddings.clear()

    for part, fragment in zip(parts, pieces, strict=True):
        if not isinstance(part, Fragment) or not isinstance(fragment, list):
            close_chunk()  # BREAK
            continue
        for piece in fragment:
            if isinstance(piece, EmbeddingUse):
                vectors = sizes[piece.name]
                if len(ids) + vectors > CHUNK_TOKENS:
                    close_chunk()
                embeddings.append((len(ids) + 1, piece.name))  # + 1: after BOS
                ids.extend([EMBEDDING_PLACEHOLDER] * vectors)
                weights.extend([part.weight] * vectors)
                continue
            for token in next(tokenized):
                if len(ids) == CHUNK_TOKENS:
                    close_chunk()
                ids.append(token)
                weights.append(part.weight)
    if ids or not chunks:
        close_chunk()
    return chunks


def _text_encoders(pipeline: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs in diffusers' order: the refiner has the second only."""
    if pipeline.tokenizer is None:
        return [(pipeline.tokenizer_2, pipeline.text_encoder_2)]
    return [
        (pipeline.tokenizer, pipeline.text_encoder),
        (pipeline.tokenizer_2, pipeline.text_encoder_2),
    ]


def _guides(pipeline: Any, guidance_scale: float) -> bool:
    """Whether the pipeline runs classifier-free guidance, as its own property decides."""
    return guidance_scale > 1 and pipeline.unet.config.time_cond_proj_dim is None


def chunk_count(
    pipeline: Any, text: str, syntax: PromptSyntax, sizes: Mapping[str, int] | None = None
) -> int:
    parts = parse_prompt(text, syntax)
    return max(
        len(token_chunks(tokenizer, parts, sizes)) for tokenizer, _ in _text_encoders(pipeline)
    )


def image_chunk_counts(
    pipeline: Any,
    prompts: list[str],
    negative_prompts: list[str],
    guidance_scale: float,
    syntax: PromptSyntax,
    sizes: Mapping[str, int] | None = None,
) -> list[int]:
    """How many chunks each image's conditioning has: its prompt's or its negative's, longer.

    Images of equal counts share a pipeline call unchanged; an image is never
    padded for its batch neighbours, so it is the same alone and batched.
    """
    guides = _guides(pipeline, guidance_scale)
    return [
        max(
            chunk_count(pipeline, prompt, syntax, sizes),
            chunk_count(pipeline, negative, syntax, sizes) if guides else 1,
        )
        for prompt, negative in zip(prompts, negative_prompts, strict=True)
    ]


def _emphasise(hidden: torch.Tensor, chunks: list[TokenChunk]) -> torch.Tensor:
    """A1111's emphasis on one chunk of a batch: z * w, then back to the original mean.

    Image by image, so an image's result does not depend on its neighbours;
    an image with no emphasis is left untouched, bit for bit.
    """
    if not any(chunk.emphasised for chunk in chunks):
        return hidden
    rows = []
    for z, chunk in zip(hidden, chunks, strict=True):
        if chunk.emphasised:
            weights = torch.tensor(chunk.weights, dtype=z.dtype, device=z.device)
            original_mean = z.mean()
            z = z * weights[:, None]
            new_mean = z.mean()
            if new_mean != 0:  # all-zero weights: nothing to scale back
                z = z * (original_mean / new_mean)
        rows.append(z)
    return torch.stack(rows)


def encode_texts(
    pipeline: Any,
    texts: list[str],
    syntax: PromptSyntax,
    chunk_total: int,
    clip_skip: int = 1,
    embeddings: Mapping[str, EmbeddingVectors] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (batch, 77 * chunk_total, features) and pooled embeddings of `texts`.

    Texts shorter than `chunk_total` chunks are padded with chunks of the
    empty prompt, as A1111 pads a prompt to its negative's length. `clip_skip`
    counts as A1111 does: 1 is SDXL's penultimate layer, 2 the layer before
    (diffusers' `clip_skip=1`: hidden_states[-(clip_skip + 2)]).
    """
    device = pipeline._execution_device
    parts = [parse_prompt(text, syntax) for text in texts]
    embeddings = embeddings or {}
    sizes = {name: vectors.vectors for name, vectors in embeddings.items()}
    per_encoder: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for tokenizer, text_encoder in _text_encoders(pipeline):
        (empty_chunk,) = token_chunks(tokenizer, [Fragment("")])
        chunked = []
        for text_parts in parts:
            chunks = token_chunks(tokenizer, text_parts, sizes)
            if len(chunks) > chunk_total:
                raise ValueError(f"a prompt of {len(chunks)} chunks in a call of {chunk_total}")
            chunked.append(chunks + [empty_chunk] * (chunk_total - len(chunks)))
        hidden_states = []
        for index in range(chunk_total):
            column = [chunks[index] for chunks in chunked]
            ids = torch.tensor([chunk.ids for chunk in column])
            key = encoder_key(pipeline, text_encoder)
            placements = [
                [(at, embeddings[name].half(key)) for at, name in chunk.embeddings]
                for chunk in column
            ]
            with vectors_placed(text_encoder, placements):
                output = text_encoder(
                    ids.to(get_module_execution_device(text_encoder)), output_hidden_states=True
                )
            # As diffusers: the pooled output is the encoder's whose first output
            # is 2-D (text_encoder_2's projection), the hidden states penultimate.
            if index == 0 and pooled is None and output[0].ndim == 2:
                pooled = output[0]
            hidden_states.append(_emphasise(output.hidden_states[-1 - clip_skip], column))
        per_encoder.append(torch.cat(hidden_states, dim=1))
    assert pooled is not None  # every SDXL pipeline has text_encoder_2
    embeds = torch.concat(per_encoder, dim=-1)
    return embeds.to(dtype=pipeline.text_encoder_2.dtype, device=device), pooled


def prompt_embeddings(
    pipeline: Any,
    prompts: list[str],
    negative_prompts: list[str],
    guidance_scale: float,
    syntax: PromptSyntax = PromptSyntax.A1111,
    clip_skip: int = 1,
    embeddings: Mapping[str, EmbeddingVectors] | None = None,
) -> dict[str, Any]:
    """The `prompt_embeds` family of arguments for an SDXL base or refiner pipeline.

    Every image of one call must have the same `image_chunk_counts` (the
    batch policy groups them so); its prompt and negative are padded to that.

    diffusers zeroes the negative embeddings (force_zeros_for_empty_prompt,
    how SDXL base was tuned; the refiner's config is False) only when no
    negative prompt is passed at all; done per image here so an image with
    no negative prompt is the same whether or not its batch neighbours have one.
    """
    guides = _guides(pipeline, guidance_scale)
    sizes = {name: vectors.vectors for name, vectors in (embeddings or {}).items()}
    counts = image_chunk_counts(pipeline, prompts, negative_prompts, guidance_scale, syntax, sizes)
    chunk_total = max(counts)
    embeds, pooled = encode_texts(pipeline, prompts, syntax, chunk_total, clip_skip, embeddings)
    negative_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    if guides:
        negative_embeds, negative_pooled = encode_texts(
            pipeline, negative_prompts, syntax, chunk_total, clip_skip, embeddings
        )
        if pipeline.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([not text for text in negative_prompts], device=embeds.device)
            negative_embeds = torch.where(empty[:, None, None], 0, negative_embeds)
            negative_pooled = torch.where(empty[:, None], 0, negative_pooled)
    return {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative_embeds,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }
