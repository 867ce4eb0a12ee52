from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_service.choices import DType, Preset, RefinerMode, SchedulerName
from sdxl_service.settings import Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[2]
CONFIGURATION = REPO / "docs" / "CONFIGURATION.md"


def test_every_setting_is_in_the_configuration_table() -> None:
    """docs/CONFIGURATION.md (linked from the README) has a row for each setting."""
    lines = CONFIGURATION.read_text().splitlines()
    variables = " ".join(line.split("|")[1] for line in lines if line.startswith("| `SDXL_"))
    missing = [f"SDXL_{name.upper()}" for name in Settings.model_fields]
    missing = [var for var in missing if f"`{var}`" not in variables]
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
    with pytest.raises(SettingsError, match="SDXL_MAX_BATCH_IMAGES='0'"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("SDXL_REFINER", "both", "'ensemble', 'sequential' or 'none'"),
        ("SDXL_SCHEDULER", "magic", "'euler', 'euler_a'"),
        ("SDXL_ATTENTION", "flash", "'sdpa' or 'eager'"),
        ("SDXL_DEVICE", "tpu", "auto|cpu|mps|cuda"),
        ("SDXL_DTYPE", "int8", "'float16', 'bfloat16' or 'float32'"),
        ("SDXL_PRESET", "large", "'auto', 'sdxl' or 'tiny'"),
        ("SDXL_VAE_DTYPE", "fp8", "'float16'"),
        ("SDXL_FILES_URL", "http://bucket", "s3://"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_accepts(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, allowed: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert f"{variable}='{value}'" in message
    assert allowed in message


def test_every_bad_variable_is_reported_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_REFINER", "both")
    monkeypatch.setenv("SDXL_STEPS", "0")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "SDXL_REFINER='both'" in str(caught.value)
    assert "SDXL_STEPS='0'" in str(caught.value)


def test_settings_that_contradict_each_other_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_REQUEST_TIMEOUT", "900")
    monkeypatch.setenv("SDXL_TRAFFIC_TIMEOUT", "600")
    with pytest.raises(SettingsError, match="SDXL_TRAFFIC_TIMEOUT"):
        load_settings()


@pytest.mark.parametrize(("alias", "dtype"), [("fp16", DType.FLOAT16), ("BF16", DType.BFLOAT16)])
def test_dtype_aliases_are_accepted(
    monkeypatch: pytest.MonkeyPatch, alias: str, dtype: DType
) -> None:
    monkeypatch.setenv("SDXL_DTYPE", alias)
    assert load_settings().dtype is dtype


def test_the_settings_enums_are_the_apis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_SCHEDULER", "dpmpp_2m_karras")
    monkeypatch.setenv("SDXL_REFINER", "none")
    settings = load_settings()
    assert settings.scheduler is SchedulerName.DPMPP_2M_KARRAS
    assert settings.refiner is RefinerMode.NONE


def test_bentoml_serve_stops_at_once_on_a_bad_setting(tmp_path: Path) -> None:
    """Before any model loads: the CLI exits with the message, no worker starts."""
    bentoml = Path(sys.executable).parent / "bentoml"
    env = {
        **os.environ,
        "SDXL_REFINER": "both",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    result = subprocess.run(
        [str(bentoml), "serve", "service:ImagesAPI", "--port", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "SDXL_REFINER='both'" in result.stderr + result.stdout
    assert "ensemble" in result.stderr + result.stdout


@pytest.mark.parametrize("variable", ["SDXL_BASE_MODEL", "SDXL_REFINER_MODEL", "SDXL_VAE"])
@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "vae.bin"])
def test_a_pickled_checkpoint_is_refused_before_anything_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, name: str
) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x80\x04 not unpickled")
    monkeypatch.setenv(variable, str(path))
    with pytest.raises(
        SettingsError, match=rf"{variable}=.+{name} is not a \.safetensors file.+runs"
    ):
        load_settings()


def test_a_file_of_another_kind_and_a_missing_checkpoint_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("SDXL_BASE_MODEL", str(tmp_path / "model.gguf"))
    monkeypatch.setenv("SDXL_REFINER_MODEL", str(tmp_path / "typo.safetensors"))
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "SDXL_BASE_MODEL=" in str(refused.value)
    assert "model.gguf is not a .safetensors file" in str(refused.value)
    assert f"SDXL_REFINER_MODEL='{tmp_path}/typo.safetensors': no such file" in str(refused.value)


def test_hub_ids_folders_and_safetensors_files_are_model_sources(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "mine.safetensors").write_bytes(b"")
    monkeypatch.setenv("SDXL_BASE_MODEL", str(tmp_path / "mine.safetensors"))
    monkeypatch.setenv("SDXL_REFINER_MODEL", str(tmp_path))
    monkeypatch.setenv("SDXL_VAE", "madebyollin/sdxl-vae-fp16-fix")
    settings = load_settings()
    assert settings.base_model == str(tmp_path / "mine.safetensors")
    assert Settings().refiner_model == str(tmp_path)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("SDXL_WEBHOOK_SECRET", "not-a-secret", "whsec_"),
        ("SDXL_WEBHOOK_SECRET", "whsec_c2hvcnQ=", "24 to 64 random bytes"),
        ("SDXL_WEBHOOK_HOSTS", "127.0.0.1, bad host!", "'bad host!'"),
        ("SDXL_JOBS_DATABASE_URL", "mysql://x", "postgresql://"),
    ],
)
def test_bad_job_and_webhook_settings_fail_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert variable in str(caught.value) and says in str(caught.value)
    # A secret is never echoed back.
    if variable == "SDXL_WEBHOOK_SECRET":
        assert value not in str(caught.value)


def test_webhook_hosts_are_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_WEBHOOK_HOSTS", "public, 10.0.0.0/8,Hooks.Example.com")
    assert load_settings().webhook_hosts == ["public", "10.0.0.0/8", "hooks.example.com"]


def test_the_control_cache_must_hold_a_requests_controlnets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SDXL_MAX_CONTROLNETS", "4")
    monkeypatch.setenv("SDXL_CONTROL_CACHE", "3")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "SDXL_CONTROL_CACHE (3)" in str(caught.value)
    assert "SDXL_MAX_CONTROLNETS (4)" in str(caught.value)
    monkeypatch.setenv("SDXL_CONTROL_CACHE", "4")
    assert load_settings().control_cache == 4


# --- SDXL_SAFETY_CHECKER and SDXL_SAFETY_LABELS ---------------------------------------------


def test_the_safety_checker_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_SAFETY_CHECKER", "")
    settings = load_settings()
    assert settings.safety_checker is None
    assert settings.safety_labels == ["nsfw"]


def test_a_safety_checker_hub_id_or_folder_is_taken(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests import safety_checkers

    monkeypatch.setenv("SDXL_SAFETY_CHECKER", "Falconsai/nsfw_image_detection")
    assert load_settings().safety_checker == "Falconsai/nsfw_image_detection"
    safety_checkers.vit_classifier(tmp_path, flags_everything=True)
    monkeypatch.setenv("SDXL_SAFETY_CHECKER", str(tmp_path))
    monkeypatch.setenv("SDXL_SAFETY_LABELS", "nsfw, normal")
    settings = load_settings()
    assert (settings.safety_checker, settings.safety_labels) == (str(tmp_path), ["nsfw", "normal"])


@pytest.mark.parametrize(
    ("setup", "labels", "says"),
    [
        ("missing", "nsfw", "SDXL_SAFETY_CHECKER='{folder}/missing': expected a classifier's"),
        ("empty", "nsfw", "SDXL_SAFETY_CHECKER='{folder}/empty': {folder}/empty has no config"),
        ("pickled", "nsfw", "SDXL_SAFETY_CHECKER='{folder}/pickled': {folder}/pickled has no "),
        ("vit", "porn", "SDXL_SAFETY_LABELS does not fit SDXL_SAFETY_CHECKER: the classifier "),
    ],
)
def test_a_safety_checker_folder_that_cannot_serve_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, setup: str, labels: str, says: str
) -> None:
    from tests import safety_checkers

    (tmp_path / "empty").mkdir()
    safety_checkers.vit_classifier(tmp_path / "vit", flags_everything=True)
    safety_checkers.vit_classifier(tmp_path / "pickled", flags_everything=True)
    (tmp_path / "pickled" / "model.safetensors").rename(tmp_path / "pickled" / "model.bin")
    monkeypatch.setenv("SDXL_SAFETY_CHECKER", str(tmp_path / setup))
    monkeypatch.setenv("SDXL_SAFETY_LABELS", labels)
    with pytest.raises(SettingsError, match="invalid settings") as refused:
        load_settings()
    assert says.format(folder=tmp_path) in str(refused.value)
