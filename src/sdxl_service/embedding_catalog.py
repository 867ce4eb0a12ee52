"""The textual-inversion embeddings in SDXL_EMBEDDINGS_DIR, and where prompts name them (no torch).

An SDXL embedding is `<name>.safetensors` holding two tensors, `clip_l` (vectors x 768, for
the first text encoder) and `clip_g` (vectors x 1280, for OpenCLIP bigG: the refiner's only
encoder), the format SDXL embeddings are published in. A prompt uses one by writing its
name, as in AUTOMATIC1111. Only the files' headers are read here (tensor names and shapes,
through safetensors' lazy reader), so the HTTP process lists and checks them without
torch; the render worker loads the vectors (engine/embeddings.py). The folder is read again
whenever it changes: new files need no restart.

Where a prompt names an embedding: AUTOMATIC1111 matches the CLIP tokens of the name against
the prompt's tokens. CLIP tokenizes word by word (its pre-tokenizer splits the lowercased
text into letter runs, single digits and runs of other marks; BPE never crosses them), so
here the name's words are matched against the prompt's words, case-insensitively and
whatever the spaces between them, which is what A1111's token match amounts to for whole
words: `negativeXL`, `NEGATIVEXL`, `(negativeXL:1.2)` and `by-negativeXL` name the embedding
(`-` is a word of its own), `negativeXLs` and `nonegativeXL` (other words) do not. One
difference: A1111 also matches a name whose tokens happen to be the tail of a longer word's
BPE split (a file `xl` in `negativexl`); here a name matches whole words only.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .folder_catalog import NAME_PATTERN, FolderCatalog

logger = logging.getLogger(__name__)

# The two halves of an SDXL embedding, by the text encoder each is for.
CLIP_L = "clip_l"
CLIP_G = "clip_g"
# SDXL's text encoders' widths (CLIP ViT-L, OpenCLIP bigG): what a file is checked against
# until the render worker says what its encoders take (the tiny preset's are narrower).
SDXL_WIDTHS = {CLIP_L: 768, CLIP_G: 1280}
# A 75-token chunk holds an embedding whole (AUTOMATIC1111 moves one that does not fit to
# the next chunk), so no embedding may have more vectors than a chunk has tokens.
MAX_VECTORS = 75
# CLIP's pre-tokenizer (its `pat`), with `re`'s classes for \p{L} and \p{N}: contractions,
# letter runs, single digits, runs of anything else that is no space.
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)
_NAME = re.compile(NAME_PATTERN)


def words(text: str) -> list[tuple[str, int, int]]:
    """The CLIP words of `text`, lowercased as CLIP reads them, each with its span in `text`."""
    return [(match.group(0).lower(), match.start(), match.end()) for match in _WORDS.finditer(text)]


@dataclass(frozen=True, kw_only=True)
class EmbeddingFile:
    name: str
    path: Path
    vectors: int = 0  # tokens it takes in a prompt
    widths: dict[str, int] | None = None  # clip_l and clip_g widths
    problem: str | None = None  # why it is no SDXL embedding

    def problem_for(self, widths: Mapping[str, int] | None = None) -> str | None:
        """Why it cannot be used with text encoders of `widths` (SDXL's by default)."""
        if self.problem is not None:
            return self.problem
        expected = dict(widths or SDXL_WIDTHS)
        assert self.widths is not None
        if self.widths != expected:
            return (
                f"its vectors are {self.widths[CLIP_L]} and {self.widths[CLIP_G]} wide; this "
                f"model's text encoders take {expected[CLIP_L]} and {expected[CLIP_G]}"
            )
        return None

    def describe(self, widths: Mapping[str, int] | None = None) -> dict[str, object]:
        card: dict[str, object] = {"name": self.name, "vectors": self.vectors}
        if (problem := self.problem_for(widths)) is not None:
            card["problem"] = problem
        return card


@dataclass(frozen=True)
class EmbeddingUse:
    """Where a prompt names an embedding: its name and the characters that name it."""

    name: str
    start: int
    end: int


def read_embedding_file(name: str, path: Path) -> EmbeddingFile:
    """The embedding at `path` from its header; `problem` says why it is no SDXL embedding."""
    from safetensors import safe_open

    def unusable(problem: str) -> EmbeddingFile:
        return EmbeddingFile(name=name, path=path, problem=problem)

    try:
        with safe_open(str(path), framework="numpy") as tensors:
            keys = list(tensors.keys())
            shapes = {key: list(tensors.get_slice(key).get_shape()) for key in keys}
    except Exception:  # safetensors raises its own error types for damage
        return unusable("the file is not a readable safetensors file")
    if CLIP_L not in shapes or CLIP_G not in shapes:
        if "emb_params" in shapes or any(key.startswith("string_to_param") for key in shapes):
            return unusable(
                "it is an SD 1.5 embedding (one emb_params tensor); SDXL embeddings hold "
                "clip_l and clip_g tensors"
            )
        return unusable("it holds no clip_l and clip_g tensors (an SDXL embedding does)")
    clip_l, clip_g = shapes[CLIP_L], shapes[CLIP_G]
    if len(clip_l) != 2 or len(clip_g) != 2 or clip_l[0] != clip_g[0]:
        return unusable(
            f"its clip_l {tuple(clip_l)} and clip_g {tuple(clip_g)} are not two matrices of "
            "as many vectors"
        )
    if not 1 <= clip_l[0] <= MAX_VECTORS:
        return unusable(f"it has {clip_l[0]} vectors; an embedding has 1 to {MAX_VECTORS}")
    return EmbeddingFile(
        name=name, path=path, vectors=clip_l[0], widths={CLIP_L: clip_l[1], CLIP_G: clip_g[1]}
    )


def find_uses(text: str, names: Iterable[str]) -> list[EmbeddingUse]:
    """Where `text` names one of `names`, in order; at each word the name of most words
    wins (as A1111 tries the longest first), then the first in name order."""
    by_first = _name_index(tuple(sorted(names)))
    if not by_first:
        return []
    found = words(text)
    texts = [word for word, _, _ in found]
    uses: list[EmbeddingUse] = []
    index = 0
    while index < len(found):
        for name_words, name in by_first.get(texts[index], ()):
            if texts[index : index + len(name_words)] == name_words:
                end = found[index + len(name_words) - 1][2]
                uses.append(EmbeddingUse(name, found[index][1], end))
                index += len(name_words)
                break
        else:
            index += 1
    return uses


@functools.lru_cache(maxsize=16)
def _name_index(names: tuple[str, ...]) -> dict[str, list[tuple[list[str], str]]]:
    """The names by their first word, the longest first: built once per set of names (every
    queued image is looked at with the same folder's)."""
    by_first: dict[str, list[tuple[list[str], str]]] = {}
    for name in names:
        name_words = [word for word, _, _ in words(name)]
        if name_words:
            by_first.setdefault(name_words[0], []).append((name_words, name))
    for candidates in by_first.values():
        candidates.sort(key=lambda candidate: -len(candidate[0]))
    return by_first


def names_in(text: str, names: Iterable[str]) -> list[str]:
    """The embeddings `text` names, each once, in the order of first use."""
    return list(dict.fromkeys(use.name for use in find_uses(text, names)))


class EmbeddingCatalog(FolderCatalog[EmbeddingFile]):
    """The embedding files of one folder by name (the file name without `.safetensors`)."""

    def _candidates(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        if self.folder is None or not self.folder.is_dir():
            return found
        for path in sorted(self.folder.iterdir(), key=lambda p: p.name):
            if path.suffix.lower() == ".safetensors" and path.is_file() and _NAME.match(path.stem):
                found[path.stem] = path
        return found

    def _folder_stamp(self) -> tuple[float, ...]:
        # The render worker looks at the folder for every queued image (Engine.
        # conditioning_chunks): one scandir and one stat per file, not the base class's
        # Path walk (0.66 ms for 50 files on 2 busy cores; this, about a quarter of it).
        if self.folder is None:
            return ()
        try:
            files = []
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if entry.name.lower().endswith(".safetensors") and entry.is_file():
                        stat = entry.stat()
                        files.append((entry.name, stat.st_mtime, float(stat.st_size)))
            folder_mtime = self.folder.stat().st_mtime
        except OSError:
            return ()
        return (folder_mtime, *(value for _, *values in sorted(files) for value in values))

    def _read(self, name: str, path: Path) -> EmbeddingFile:
        entry = read_embedding_file(name, path)
        if entry.problem is not None:
            logger.warning("embedding %s cannot be used: %s", name, entry.problem)
        return entry

    def short_hash(self, entry: EmbeddingFile) -> str | None:
        """`TI hashes`' name of the file, A1111's `hashes.sha256` of it
        (FolderCatalog.file_short_hash)."""
        return self.file_short_hash(entry.path)
