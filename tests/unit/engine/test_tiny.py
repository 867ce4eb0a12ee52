"""The tiny random-weight SDXL pair: layout, SDXL-shaped conditioning, build safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from sdxl_service.engine import tiny
from sdxl_service.engine.components import EOS_TOKEN, build_clip_tokenizer
from sdxl_service.engine.tiny import (
    BASE_TIME_IDS,
    REFINER_TIME_IDS,
    TINY_VERSION,
    build_tiny_pipelines,
    ensure_tiny_pair,
)


@pytest.fixture(scope="module")
def loaded_pair(tiny_pair: tuple[Path, Path]):
    base_dir, refiner_dir = tiny_pair
    base = StableDiffusionXLPipeline.from_pretrained(base_dir, use_safetensors=True)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir, use_safetensors=True)
    return base, refiner


def test_pair_is_saved_in_the_sdxl_repo_layouts(tiny_pair: tuple[Path, Path]) -> None:
    base_dir, refiner_dir = tiny_pair
    assert base_dir.parent.name == TINY_VERSION
    for component in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (base_dir / component).is_dir(), component
    assert (base_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (base_dir / "text_encoder_2" / "model.safetensors").is_file()
    assert (base_dir / "tokenizer" / "vocab.json").is_file()
    assert (base_dir / "tokenizer" / "merges.txt").is_file()

    assert not (refiner_dir / "text_encoder").exists()
    assert not (refiner_dir / "tokenizer").exists()
    base_index = json.loads((base_dir / "model_index.json").read_text())
    refiner_index = json.loads((refiner_dir / "model_index.json").read_text())
    assert base_index["_class_name"] == "StableDiffusionXLPipeline"
    assert base_index["force_zeros_for_empty_prompt"] is True
    assert refiner_index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert refiner_index["requires_aesthetics_score"] is True
    assert refiner_index["force_zeros_for_empty_prompt"] is False
    assert refiner_index["text_encoder"] == [None, None]


def test_pair_reloads_with_sdxl_shaped_conditioning(loaded_pair) -> None:
    base, refiner = loaded_pair
    text_1, text_2 = base.text_encoder.config, base.text_encoder_2.config
    unet = base.unet.config
    assert unet.cross_attention_dim == text_1.hidden_size + text_2.hidden_size
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == (
        text_2.projection_dim + BASE_TIME_IDS * unet.addition_time_embed_dim
    )
    refiner_unet = refiner.unet.config
    assert refiner.text_encoder is None
    assert refiner_unet.cross_attention_dim == text_2.hidden_size
    assert refiner_unet.projection_class_embeddings_input_dim == (
        text_2.projection_dim + REFINER_TIME_IDS * refiner_unet.addition_time_embed_dim
    )
    assert refiner.config.requires_aesthetics_score is True
    assert len(base.vae.config.block_out_channels) == 4
    assert base.vae_scale_factor == 8
    assert type(base.scheduler).__name__ == "EulerDiscreteScheduler"
    assert base.scheduler.config.timestep_spacing == "leading"


def test_saved_tokenizer_matches_the_offline_builder(tiny_pair: tuple[Path, Path]) -> None:
    base_dir, _ = tiny_pair
    saved = CLIPTokenizer.from_pretrained(base_dir / "tokenizer")
    built = build_clip_tokenizer()
    text = "An astronaut riding a green horse, 4k — ünïcödé ✨"
    saved_ids = saved(text).input_ids
    assert saved_ids == built(text).input_ids
    assert saved_ids[0] == saved.bos_token_id
    assert saved_ids[-1] == saved.eos_token_id
    # Legacy CLIP configs pool at argmax(input_ids): EOS must be the largest id.
    assert saved.eos_token_id == max(saved.get_vocab().values())
    assert saved.convert_ids_to_tokens(saved.eos_token_id) == EOS_TOKEN
    long_ids = saved("word " * 200, truncation=True, max_length=saved.model_max_length).input_ids
    assert len(long_ids) == 77


def test_second_call_reuses_the_built_pair(tiny_cache_dir: Path) -> None:
    base_dir, refiner_dir = ensure_tiny_pair(tiny_cache_dir)
    weights = base_dir / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_tiny_pair(tiny_cache_dir) == (base_dir, refiner_dir)
    assert weights.stat().st_mtime_ns == before
    assert sorted(p.name for p in tiny_cache_dir.iterdir()) == [TINY_VERSION]


def test_weights_are_the_same_on_every_build() -> None:
    global_state = torch.random.get_rng_state()
    first_base, first_refiner = build_tiny_pipelines()
    second_base, second_refiner = build_tiny_pipelines()
    for first, second in [
        (first_base.unet, second_base.unet),
        (first_refiner.unet, second_refiner.unet),
        (first_base.vae, second_base.vae),
        (first_base.text_encoder_2, second_base.text_encoder_2),
    ]:
        second_state = second.state_dict()
        for name, tensor in first.state_dict().items():
            assert torch.equal(tensor, second_state[name]), name
    # Building must not reseed the caller's global RNG.
    assert torch.equal(torch.random.get_rng_state(), global_state)


def test_losing_a_build_race_keeps_the_winner(tmp_path: Path, monkeypatch) -> None:
    real_build = tiny.build_tiny_pipelines
    calls = []

    def build_while_another_process_finishes_first():
        calls.append(1)
        if len(calls) == 1:
            ensure_tiny_pair(tmp_path)  # the "other process" wins the rename
        return real_build()

    monkeypatch.setattr(tiny, "build_tiny_pipelines", build_while_another_process_finishes_first)
    base_dir, refiner_dir = ensure_tiny_pair(tmp_path)

    assert len(calls) == 2
    # Only the finished folder is left: no half-written staging folders.
    assert sorted(p.name for p in tmp_path.iterdir()) == [TINY_VERSION]
    assert (base_dir / "model_index.json").is_file()
    assert (refiner_dir / "model_index.json").is_file()
