"""Derive CLIP's BPE tokenizer files (vocab.json, merges.txt) from the open_clip_torch wheel.

Single-file SDXL checkpoints carry no tokenizer, and the service loads them offline, so the
tokenizer both SDXL text encoders use (CLIP ViT-L's; OpenCLIP bigG's is the same BPE, padded
with "!") ships with the package. The wheel of `open_clip_torch` (PyPI) holds OpenAI's merges
as `open_clip/bpe_simple_vocab_16e6.txt.gz`; the vocabulary is derived from them as OpenAI's
SimpleTokenizer does, which is also how openai/clip-vit-large-patch14's vocab.json was made:
the 256 byte characters, each again with "</w>", one token per merge, then the two specials.

    .venv/bin/pip download open_clip_torch --no-deps -d /tmp/open_clip
    .venv/bin/python scripts/make_clip_bpe.py /tmp/open_clip/open_clip_torch-*.whl

writes src/sdxl_service/engine/sdxl_configs/clip_bpe/{vocab.json,merges.txt}.gz (gzip without
a timestamp, so the same wheel gives the same bytes).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import zipfile
from pathlib import Path

from sdxl_service.engine.components import bytes_to_unicode

MERGES_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
OUT = Path(__file__).resolve().parents[1] / "src/sdxl_service/engine/sdxl_configs/clip_bpe"
# OpenAI's SimpleTokenizer: `merges[1 : 49152 - 256 - 2 + 1]` (line 0 is a version header).
MERGE_COUNT = 49152 - 256 - 2
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def derive(merges_text: str) -> tuple[dict[str, int], list[str]]:
    merges = merges_text.split("\n")[1 : MERGE_COUNT + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += SPECIALS
    return {token: index for index, token in enumerate(tokens)}, merges


def write_gzip(path: Path, text: str) -> None:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as file:
        file.write(text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="an open_clip_torch-*.whl")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    with zipfile.ZipFile(args.wheel) as wheel:
        merges_text = gzip.decompress(wheel.read(MERGES_IN_WHEEL)).decode("utf-8")
    vocab, merges = derive(merges_text)
    if len(vocab) != 49408:
        raise SystemExit(f"derived {len(vocab)} tokens, CLIP has 49408: not CLIP's merges file")
    args.out.mkdir(parents=True, exist_ok=True)
    # The layout of openai/clip-vit-large-patch14's files, which transformers reads.
    write_gzip(args.out / "vocab.json.gz", json.dumps(vocab, ensure_ascii=False))
    write_gzip(args.out / "merges.txt.gz", "#version: 0.2\n" + "\n".join(merges) + "\n")
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {args.out}")


if __name__ == "__main__":
    main()
