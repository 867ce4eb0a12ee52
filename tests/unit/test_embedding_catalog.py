"""The embeddings folder read without torch: which files are SDXL embeddings, where a prompt
names one (AUTOMATIC1111's whole-token match), their A1111 short hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdxl_service.embedding_catalog import (
    SDXL_WIDTHS,
    EmbeddingCatalog,
    find_uses,
    names_in,
    read_embedding_file,
)


def sdxl_embedding(path: Path, vectors: int = 2, widths: tuple[int, int] = (768, 1280)) -> Path:
    save_file(
        {
            "clip_l": np.ones((vectors, widths[0]), np.float16),
            "clip_g": np.ones((vectors, widths[1]), np.float16),
        },
        str(path),
    )
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a photo, negativeXL", ["negativeXL"]),
        ("NEGATIVEXL", ["negativeXL"]),  # CLIP lowercases
        ("(negativeXL:1.2), [bad-hands-5]", ["negativeXL", "bad-hands-5"]),
        ("by-negativeXL", ["negativeXL"]),  # `-` is a word of its own
        ("negativeXLs, nonegativeXL, negative XL", []),  # other words
        ("bad - hands - 5", ["bad-hands-5"]),  # the same tokens, whatever the spaces
        ("bad-hands-50", ["bad-hands-5"]),  # each digit is a token of its own, in A1111 too
        ("negativeXL-v2 and negativeXL", ["negativeXL-v2", "negativeXL"]),  # the longest first
    ],
)
def test_a_prompt_names_an_embedding_by_whole_words(text: str, expected: list[str]) -> None:
    names = ["negativeXL", "negativeXL-v2", "bad-hands-5"]
    assert names_in(text, names) == expected


def test_uses_give_the_characters_that_name_the_embedding() -> None:
    text = "a (NegativeXL:1.2) fox"
    (use,) = find_uses(text, ["negativeXL"])
    assert text[use.start : use.end] == "NegativeXL"


def test_an_sdxl_embedding_is_read_from_its_header(tmp_path: Path) -> None:
    entry = read_embedding_file("neg", sdxl_embedding(tmp_path / "neg.safetensors", vectors=4))
    assert (entry.vectors, entry.problem_for()) == (4, None)
    assert entry.describe() == {"name": "neg", "vectors": 4}
    # The tiny preset's encoders take other widths: the render worker says which.
    assert "768 and 1280 wide" in str(entry.problem_for({"clip_l": 32, "clip_g": 64}))


def test_files_that_are_no_sdxl_embedding_say_why(tmp_path: Path) -> None:
    save_file({"emb_params": np.ones((2, 768), np.float32)}, str(tmp_path / "sd15.safetensors"))
    save_file({"weight": np.ones((2, 8), np.float32)}, str(tmp_path / "other.safetensors"))
    save_file(
        {"clip_l": np.ones((2, 768), np.float32), "clip_g": np.ones((3, 1280), np.float32)},
        str(tmp_path / "uneven.safetensors"),
    )
    sdxl_embedding(tmp_path / "huge.safetensors", vectors=76)
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    problems = {
        name: entry.problem for name, entry in EmbeddingCatalog(tmp_path).snapshot().items()
    }
    assert "SD 1.5 embedding" in str(problems["sd15"])
    assert "no clip_l and clip_g" in str(problems["other"])
    assert "as many vectors" in str(problems["uneven"])
    assert "76 vectors" in str(problems["huge"])
    assert "not a readable safetensors" in str(problems["cut"])


def test_the_folder_is_read_again_when_it_changes(tmp_path: Path) -> None:
    catalog = EmbeddingCatalog(tmp_path)
    assert catalog.snapshot() == {}
    path = sdxl_embedding(tmp_path / "neg.safetensors", vectors=1)
    (tmp_path / "notes.txt").write_text("not an embedding")
    assert {name: e.vectors for name, e in catalog.snapshot().items()} == {"neg": 1}
    sdxl_embedding(path, vectors=3)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert catalog.snapshot()["neg"].vectors == 3
    path.unlink()
    assert catalog.snapshot() == {}
    assert EmbeddingCatalog(None).snapshot() == {}


def test_the_short_hash_is_a1111s(tmp_path: Path) -> None:
    """hashes.sha256 of the file, its first 12 hex digits (textual_inversion.py set_hash)."""
    path = sdxl_embedding(tmp_path / "neg.safetensors")
    catalog = EmbeddingCatalog(tmp_path)
    entry = catalog.snapshot()["neg"]
    assert catalog.short_hash(entry) == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_sdxl_widths_are_clip_l_and_bigg() -> None:
    assert SDXL_WIDTHS == {"clip_l": 768, "clip_g": 1280}
