from __future__ import annotations

from pathlib import Path

import pytest

from sdxl_service.settings import Preset, Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    readme = README.read_text()
    missing = [f"SDXL_{name.upper()}" for name in Settings.model_fields]
    missing = [var for var in missing if f"`{var}`" not in readme]
    assert missing == []


def test_settings_come_from_sdxl_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_PRESET", "tiny")
    monkeypatch.setenv("SDXL_MAX_BATCH_IMAGES", "3")
    monkeypatch.setenv("SDXL_RENDER_NATIVE", "false")
    settings = Settings()
    assert settings.preset is Preset.TINY
    assert settings.max_batch_images == 3
    assert settings.render_native is False


def test_invalid_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_MAX_BATCH_IMAGES", "0")
    with pytest.raises(ValueError, match="max_batch_images"):
        Settings()
