"""Shared fixtures: the tiny SDXL pair, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdxl_service.engine.config import EngineConfig
from sdxl_service.engine.tiny import ensure_tiny_pair
from sdxl_service.settings import Preset, Settings

# The tiny models gain nothing from intra-op threads, and OpenMP threads spin
# when other processes hold the cores: on this 2-core machine under load the
# engine tests took 26 s with 2 threads and 12 s with 1.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache_dir = tmp_path_factory.mktemp("sdxl-cache")
    ensure_tiny_pair(cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def tiny_pair(tiny_cache_dir: Path) -> tuple[Path, Path]:
    return ensure_tiny_pair(tiny_cache_dir)


def make_tiny_settings(cache_dir: Path, **overrides: object) -> Settings:
    # Explicit values, so SDXL_* variables in the environment cannot change a test.
    values: dict[str, object] = {
        "preset": Preset.TINY,
        "device": "cpu",
        "dtype": "float32",
        "cache_dir": cache_dir,
        "attention": "sdpa",
        "channels_last": False,
        "fuse_qkv": False,
        "compile": False,
        "vae_dtype": "auto",
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def tiny_settings_factory(tiny_cache_dir: Path):
    """`factory(**overrides)` -> tiny-preset Settings on the session's cache."""
    return lambda **overrides: make_tiny_settings(tiny_cache_dir, **overrides)


@pytest.fixture(scope="session")
def tiny_settings(tiny_cache_dir: Path) -> Settings:
    return make_tiny_settings(tiny_cache_dir)


@pytest.fixture(scope="session")
def tiny_engine(tiny_settings: Settings):
    from sdxl_service.engine import Engine

    return Engine.load(EngineConfig.of(tiny_settings))
