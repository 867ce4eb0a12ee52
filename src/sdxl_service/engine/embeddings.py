"""Textual-inversion embeddings in the text encoders' input, per call, as AUTOMATIC1111 puts them.

A prompt's chunk (engine/prompts.py) holds a placeholder token (id 0) for each vector of an
embedding it names; while its encoder call runs, a forward hook on the encoder's token
embedding writes the vectors over those positions' token embeddings, before the position
embeddings are added: A1111's `EmbeddingsWithFixes`. diffusers' `load_textual_inversion`
instead adds tokens to the tokenizer and rows to the encoder's embedding matrix for good;
the hidden states at the embedding's positions are the same either way (the parity tests
check it), but here nothing of an embedding stays in the tokenizer or the encoders after the
call, so a request that names none renders exactly as before, a word that merely contains
an embedding's name stays that word (diffusers' added tokens match inside words), and the
refiner, which shares the base's `text_encoder_2`, takes the `clip_g` vectors with nothing
loaded twice.

One difference from diffusers on real SDXL: its encoders' configs carry the old
`eos_token_id` 2, for which transformers takes the pooled output at the highest token id;
with diffusers' added tokens (ids past the vocabulary) that is the embedding's last vector,
not the end of the text. With A1111's placeholder the pooled output stays at the end of the
text, as A1111 has it. (The tiny preset's configs carry the real end id: the same there.)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..embedding_catalog import CLIP_G, CLIP_L, EmbeddingCatalog, EmbeddingFile, names_in
from .render_batch import InvalidEmbedding

# The vectors of files read lately, by file version: an embedding is a few kilobytes.
LOADED_FILES = 64


@dataclass(frozen=True)
class EmbeddingVectors:
    """One embedding's vectors for each text encoder, on the CPU in float32."""

    name: str
    clip_l: torch.Tensor  # (vectors, width of text_encoder)
    clip_g: torch.Tensor  # (vectors, width of text_encoder_2)

    @property
    def vectors(self) -> int:
        return int(self.clip_l.shape[0])

    def half(self, key: str) -> torch.Tensor:
        return self.clip_l if key == CLIP_L else self.clip_g


def encoder_key(pipeline: Any, text_encoder: Any) -> str:
    """Which half of an SDXL embedding `text_encoder` of `pipeline` takes."""
    return CLIP_G if text_encoder is pipeline.text_encoder_2 else CLIP_L


def encoder_widths(pipeline: Any) -> dict[str, int]:
    """The widths of a base pipeline's two text encoders' token embeddings."""
    return {
        CLIP_L: int(pipeline.text_encoder.get_input_embeddings().embedding_dim),
        CLIP_G: int(pipeline.text_encoder_2.get_input_embeddings().embedding_dim),
    }


class TextualInversions:
    """The embeddings of SDXL_EMBEDDINGS_DIR as prompts name them: their sizes for counting
    chunks (from the files' headers), their vectors for encoding (read on use, kept for the
    files read lately)."""

    def __init__(self, catalog: EmbeddingCatalog) -> None:
        self.catalog = catalog
        self._lock = threading.Lock()
        self._loaded: OrderedDict[tuple[str, int, int], EmbeddingVectors] = OrderedDict()

    def sizes(self, texts: Iterable[str]) -> dict[str, int]:
        """Vectors per embedding the texts name, usable ones only (others are refused when
        the batch renders): what a chunk count depends on besides the text."""
        folder = self.catalog.snapshot()
        usable = [name for name, entry in folder.items() if entry.problem is None]
        if not usable:
            return {}
        named: dict[str, int] = {}
        for text in texts:
            for name in names_in(text, usable):
                named[name] = folder[name].vectors
        return named

    def load(
        self, fields: Sequence[tuple[str, Sequence[str]]], widths: Mapping[str, int]
    ) -> dict[str, EmbeddingVectors]:
        """The vectors of every embedding named in the texts of each (field, texts);
        InvalidEmbedding naming the field when one cannot be used with encoders of `widths`."""
        folder = self.catalog.snapshot()
        if not folder:
            return {}
        found: dict[str, EmbeddingVectors] = {}
        for field_name, texts in fields:
            for text in texts:
                for name in names_in(text, folder):
                    if name not in found:
                        found[name] = self._vectors(folder[name], field_name, widths)
        return found

    def _vectors(
        self, entry: EmbeddingFile, field_name: str, widths: Mapping[str, int]
    ) -> EmbeddingVectors:
        def refuse(problem: str) -> InvalidEmbedding:
            return InvalidEmbedding(
                f"The embedding '{entry.name}' named in {field_name} cannot be used: {problem}."
            )

        if (problem := entry.problem_for(widths)) is not None:
            raise refuse(problem)
        try:
            stat = entry.path.stat()
            key = (str(entry.path), stat.st_size, stat.st_mtime_ns)
            with self._lock:
                known = self._loaded.get(key)
                if known is not None:
                    self._loaded.move_to_end(key)
                    return known
            from safetensors.torch import load_file

            tensors = load_file(str(entry.path), device="cpu")
        except Exception:  # gone or damaged since the folder was read
            raise refuse("the file could not be read") from None
        vectors = EmbeddingVectors(
            name=entry.name,
            clip_l=tensors[CLIP_L].float(),
            clip_g=tensors[CLIP_G].float(),
        )
        # The header was read before the file was: check what was loaded.
        loaded_widths = {CLIP_L: vectors.clip_l.shape[-1], CLIP_G: vectors.clip_g.shape[-1]}
        if loaded_widths != dict(widths) or vectors.clip_l.shape[0] != vectors.clip_g.shape[0]:
            raise refuse("the file changed while it was read")
        with self._lock:
            self._loaded[key] = vectors
            while len(self._loaded) > LOADED_FILES:
                self._loaded.popitem(last=False)
        return vectors


@contextmanager
def vectors_placed(
    text_encoder: Any, placements: Sequence[Sequence[tuple[int, torch.Tensor]]]
) -> Iterator[None]:
    """While it runs, `text_encoder`'s token embeddings of row i at positions p.. are the
    vectors v of each (p, v) of placements[i]; nothing when there are none."""
    if not any(placements):
        yield
        return
    layer = text_encoder.get_input_embeddings()

    def place(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, placed in enumerate(placements):
            for position, vectors in placed:
                output[row, position : position + vectors.shape[0]] = vectors.to(
                    device=output.device, dtype=output.dtype
                )
        return output

    handle = layer.register_forward_hook(place)
    try:
        yield
    finally:
        handle.remove()
