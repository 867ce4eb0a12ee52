"""The bento: `bentoml build` offline, what it packs, and the Dockerfile it implies.

`bentoml containerize` needs a Docker engine, which the dev and CI machines do
not have. Instead the Dockerfile is rendered with `bentoml.container.
get_containerfile`, the same code (`construct_containerfile`) that containerize
hands to Docker, and checked for what the container must do.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from sdxl_service.settings import DEFAULT_PORT

REPO = Path(__file__).resolve().parents[3]
BENTO_NAME = "stable-diffusion-xl-with-refiner"
VERSION = "test"
BENTO_USER_UID = 1034  # BentoML's `bentoml` user in the image (container/generate.py)
VOLUME = "/models"  # the registry manifest's volumePath

pytestmark = pytest.mark.timeout(180)


def _env(home: Path, tmpdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        BENTOML_HOME=str(home),
        # Analytics would reach for the network; CI has none.
        BENTOML_DO_NOT_TRACK="True",
        # BentoML 1.4.40 only reads a dockerfile_template whose path lies under
        # the working directory (bentoml/BentoML#5566), and containerize copies
        # the bento to a temporary folder first: keep that folder under the cwd.
        TMPDIR=str(tmpdir),
    )
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=150, check=False
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("bento")
    home, tmpdir = work / "bentoml-home", work / "tmp"
    tmpdir.mkdir()
    env = _env(home, tmpdir)
    python = [sys.executable, "-m", "bentoml"]
    _run([*python, "build", "--version", VERSION, "--do-not-track"], REPO, env)

    dockerfile = work / "containerize.dockerfile"
    script = textwrap.dedent(
        """
        import sys
        import bentoml
        bentoml.container.get_containerfile(sys.argv[1], output_path=sys.argv[2])
        """
    )
    _run([sys.executable, "-c", script, f"{BENTO_NAME}:{VERSION}", str(dockerfile)], work, env)

    bento = home / "bentos" / BENTO_NAME / VERSION
    return {
        "path": bento,
        "info": yaml.safe_load((bento / "bento.yaml").read_text()),
        "dockerfile": dockerfile.read_text(),
    }


def test_bento_packs_only_the_service_code(built: dict[str, Any]) -> None:
    src = built["path"] / "src"
    packed = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    package = REPO / "src" / "sdxl_service"
    expected = {"service.py", "bentofile.yaml"} | {
        p.relative_to(REPO).as_posix()
        for p in [
            *package.rglob("*.py"),
            *(package / "api" / "playground" / "assets").iterdir(),
            # What single-file checkpoints load with, offline.
            *(p for p in (package / "engine" / "sdxl_configs").rglob("*") if p.is_file()),
        ]
    }
    # service.py puts the bento's src/ folder on sys.path: the package must sit there.
    assert "src/sdxl_service/settings.py" in expected
    # Equality: no tests, bench, registry images, .venv or .cache in the image.
    assert packed == expected


def test_bento_serves_the_manifests_port_with_the_gpu_preset(built: dict[str, Any]) -> None:
    info = built["info"]
    assert info["service"] == "service:ImagesAPI"
    services = {s["name"]: s for s in info["services"]}
    assert services[BENTO_NAME]["config"]["http"]["port"] == DEFAULT_PORT
    assert services["sdxl-renderer"]["config"]["resources"] == {"gpu": 1}
    manifest = json.loads(
        (REPO / "registry" / f"diffuser-{BENTO_NAME}" / "manifest.json").read_text()
    )
    assert manifest["defaultPort"] == DEFAULT_PORT
    assert manifest["volumePath"] == VOLUME
    envs = {e["name"]: e["value"] for e in info["envs"]}
    assert envs["SDXL_PRESET"] == "sdxl"
    assert envs["HF_HOME"].startswith(VOLUME + "/")
    assert envs["SDXL_CACHE_DIR"].startswith(VOLUME + "/")


def test_bento_pins_the_projects_dependencies(built: dict[str, Any]) -> None:
    # bentofile.yaml repeats pyproject's list (lock_packages is off): keep them equal.
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert built["info"]["python"]["lock_packages"] is False
    assert built["info"]["python"]["packages"] == pyproject["project"]["dependencies"]
    requirements = (built["path"] / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0" in requirements.splitlines()


def test_dockerfile_base_has_cuda_and_the_driver_floor_torch_needs(
    built: dict[str, Any],
) -> None:
    dockerfile = built["dockerfile"]
    base = re.search(r"^FROM (\S+)", dockerfile, re.M)
    assert base and base.group(1) == "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
    # torch 2.13.0's Linux wheels link CUDA 13.0 (driver >= 580).
    assert 'ENV NVIDIA_REQUIRE_CUDA="cuda>=13.0"' in dockerfile


def test_dockerfile_gets_uv_without_pip(built: dict[str, Any]) -> None:
    dockerfile = built["dockerfile"]
    # BentoML falls back to `pip install uv==X` unless uv >= X is on PATH; the CUDA
    # image has no pip. The uv copied in must be the version BentoML asks for.
    wanted = re.search(r"'uv==(\d+\.\d+\.\d+)", dockerfile)
    copied = re.search(r"^COPY --from=ghcr\.io/astral-sh/uv:(\S+) /uv ", dockerfile, re.M)
    assert wanted and copied
    assert copied.group(1) == wanted.group(1)
    assert dockerfile.index(copied.group(0)) < dockerfile.index("command -v uv")


def test_dockerfile_environment(built: dict[str, Any]) -> None:
    dockerfile = built["dockerfile"]
    assert "ARG SDXL_PRESET=sdxl\nENV SDXL_PRESET=$SDXL_PRESET" in dockerfile
    assert f"ARG HF_HOME={VOLUME}/huggingface\nENV HF_HOME=$HF_HOME" in dockerfile
    assert f"ARG SDXL_CACHE_DIR={VOLUME}/sdxl-service" in dockerfile
    # Either would move the server off defaultPort; other SDXL_* come from `docker run -e`.
    assert not re.search(r"^(ENV|ARG) (BENTOML_PORT|PORT)\b", dockerfile, re.M)
    assert f"ARG SDXL_LORA_DIR={VOLUME}/loras" in dockerfile
    assert f"ARG SDXL_MODELS_DIR={VOLUME}/catalog" in dockerfile
    assert f"ARG SDXL_UPSCALER_DIR={VOLUME}/upscalers" in dockerfile
    assert f"ARG SDXL_EMBEDDINGS_DIR={VOLUME}/embeddings" in dockerfile
    assert f"ARG SDXL_CONTROLNET_DIR={VOLUME}/controlnets" in dockerfile
    assert not re.search(
        r"^(ENV|ARG) SDXL_(?!PRESET|CACHE_DIR|LORA_DIR|MODELS_DIR|UPSCALER_DIR|EMBEDDINGS_DIR"
        r"|CONTROLNET_DIR)",
        dockerfile,
        re.M,
    )
    assert re.search(rf"^EXPOSE {DEFAULT_PORT}$", dockerfile, re.M)


def test_dockerfile_models_folder_belongs_to_the_server_user(built: dict[str, Any]) -> None:
    dockerfile = built["dockerfile"]
    useradd = dockerfile.index(f"ARG BENTO_USER_UID={BENTO_USER_UID}")
    models = re.search(
        rf"RUN mkdir -p {VOLUME}/huggingface {VOLUME}/sdxl-service {VOLUME}/loras "
        rf"{VOLUME}/catalog && \\\n"
        rf"\s+chown -R {BENTO_USER_UID}:{BENTO_USER_UID} {VOLUME}\n",
        dockerfile,
    )
    assert models, "no /models owned by the bento user"
    assert useradd < models.start()
    # Created as root (a volume gets this owner), while the server runs as the user.
    users = [(m.start(), m.group(1)) for m in re.finditer(r"^USER (\S+)$", dockerfile, re.M)]
    assert [user for at, user in users if at < models.start()][-1] == "root"
    assert users[-1][1] == "bentoml"


def test_container_entrypoint_runs_bentoml_serve(built: dict[str, Any]) -> None:
    dockerfile = built["dockerfile"]
    entrypoint = re.findall(r"^ENTRYPOINT \[ \"(\S+)\" \]$", dockerfile, re.M)
    assert entrypoint == ["/home/bentoml/bento/env/docker/entrypoint.sh"]
    assert not re.search(r"^CMD ", dockerfile, re.M)
    script = (built["path"] / "env" / "docker" / "entrypoint.sh").read_text()
    # No arguments: `bentoml serve $BENTO_PATH`, which takes the port from service.py.
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in script


def test_the_bento_keeps_loras_on_the_models_volume(built: dict[str, Any]) -> None:
    envs = {e["name"]: e["value"] for e in built["info"]["envs"]}
    assert envs["SDXL_LORA_DIR"] == f"{VOLUME}/loras"
