"""CLIP's BPE tokenizer, shipped with the package: single-file checkpoints carry none.

Both SDXL text encoders tokenize with CLIP ViT-L's BPE (49408 tokens); OpenCLIP bigG's
tokenizer is the same one, padded with "!". The vocabulary and merges come gzipped under
sdxl_configs/clip_bpe/ (derived from open_clip's merges by scripts/make_clip_bpe.py), so a
checkpoint loads without a hub.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path
from typing import Any

CLIP_BPE = Path(__file__).parent / "sdxl_configs" / "clip_bpe"


@cache
def _bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = json.loads(gzip.decompress((CLIP_BPE / "vocab.json.gz").read_bytes()))
    lines = gzip.decompress((CLIP_BPE / "merges.txt.gz").read_bytes()).decode("utf-8")
    # Line 0 is the "#version" header of HF's merges.txt.
    merges = [tuple(line.split(" ", 1)) for line in lines.split("\n")[1:] if line]
    return vocab, merges  # type: ignore[return-value]


def packaged_clip_tokenizer(settings: dict[str, Any]) -> Any:
    """A CLIPTokenizer over the packaged BPE, with a tokenizer_config.json's special tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),  # type: ignore[arg-type]  # tokenizers takes (a, b) pairs
        bos_token=settings.get("bos_token", "<|startoftext|>"),
        eos_token=settings.get("eos_token", "<|endoftext|>"),
        unk_token=settings.get("unk_token", "<|endoftext|>"),
        pad_token=settings.get("pad_token", "<|endoftext|>"),
        model_max_length=settings.get("model_max_length", 77),
    )


def load_clip_tokenizer(folder: Path) -> Any:
    """A config folder's tokenizer: its own vocab.json and merges.txt where it has them (the
    tiny pair), else the packaged BPE with its tokenizer_config.json."""
    from transformers import CLIPTokenizer

    if (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return packaged_clip_tokenizer(json.loads((folder / "tokenizer_config.json").read_text()))
