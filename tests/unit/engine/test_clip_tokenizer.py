"""The packaged CLIP BPE tokenizer (scripts/make_clip_bpe.py) is CLIP's: known ids and splits."""

from __future__ import annotations

import json

import pytest

from sdxl_service.engine.checkpoint_layout import SDXL_CONFIGS
from sdxl_service.engine.clip_tokenizer import load_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer(SDXL_CONFIGS / "base" / "tokenizer")


def test_the_vocabulary_is_clips_49408_tokens_with_its_special_ids(tokenizer) -> None:
    assert len(tokenizer) == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert tokenizer.model_max_length == 77


def test_a_known_prompt_tokenizes_as_clip_does(tokenizer) -> None:
    # The ids openai/clip-vit-large-patch14's tokenizer gives (its model card's example).
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    # Lower-cased, as CLIP's; merges make whole words, not bytes.
    assert tokenizer("A Photo OF a CAT").input_ids == tokenizer("a photo of a cat").input_ids


def test_both_sdxl_tokenizers_share_the_bpe_and_pad_as_the_stock_repos() -> None:
    first = load_clip_tokenizer(SDXL_CONFIGS / "base" / "tokenizer")
    second = load_clip_tokenizer(SDXL_CONFIGS / "base" / "tokenizer_2")
    refiner = load_clip_tokenizer(SDXL_CONFIGS / "refiner" / "tokenizer_2")
    ids = first("a lighthouse at dusk, 35mm", padding="max_length").input_ids
    padded = second("a lighthouse at dusk, 35mm", padding="max_length").input_ids
    assert len(ids) == len(padded) == 77
    length = ids.index(49407) + 1
    assert padded[:length] == ids[:length]
    # CLIP ViT-L pads with <|endoftext|>, OpenCLIP bigG with "!" (id 0).
    assert set(ids[length:]) == {49407}
    assert set(padded[length:]) == {0}
    assert refiner("a lighthouse").input_ids == second("a lighthouse").input_ids


def test_the_tokenizer_settings_match_the_stock_repos() -> None:
    for folder, pad in (("base/tokenizer", "<|endoftext|>"), ("base/tokenizer_2", "!")):
        config = json.loads((SDXL_CONFIGS / folder / "tokenizer_config.json").read_text())
        assert config["pad_token"] == pad
        assert config["model_max_length"] == 77
