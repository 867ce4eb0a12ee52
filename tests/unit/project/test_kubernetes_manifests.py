"""deploy/kubernetes: valid against Kubernetes' own schemas, and saying what we claim."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from sdxl_service.api.files.s3 import S3FileStore
from sdxl_service.metrics import ServiceMetrics
from sdxl_service.settings import DEFAULT_PORT, Settings

REPO = Path(__file__).resolve().parents[3]
K8S = REPO / "deploy" / "kubernetes"
ADAPTER_VALUES = REPO / "deploy" / "prometheus-adapter" / "values.yaml"
# The oldest release we support (autoscaling/v2 behaviour, fsGroupChangePolicy)
# and the newest kubernetes-validate knows.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
MANIFEST_FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _resource(kind: str) -> dict[str, Any]:
    found = [
        doc
        for path in MANIFEST_FILES
        if not path.name.endswith(".example.yaml")
        for doc in _documents(path)
        if doc["kind"] == kind
    ]
    assert len(found) == 1, kind
    return found[0]


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return _resource("Deployment")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.fixture(scope="module")
def config() -> dict[str, str]:
    return _resource("ConfigMap")["data"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifest_validates(path: Path, version: str) -> None:
    for document in _documents(path):
        # strict: an unknown (misspelled) field is an error, not silently dropped.
        kubernetes_validate.validate(document, version, strict=True)


def test_kustomization_applies_everything_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    expected = {p.name for p in MANIFEST_FILES if not p.name.endswith(".example.yaml")}
    assert set(kustomization["resources"]) == expected
    assert "s3-credentials.example.yaml" not in kustomization["resources"]


def test_one_gpu_per_replica(container: dict[str, Any]) -> None:
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1


def test_container_port_is_the_services_port(container: dict[str, Any]) -> None:
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [("http", DEFAULT_PORT)]


def _http_probe(container: dict[str, Any], probe: str) -> dict[str, Any]:
    spec = container[probe]
    assert spec["httpGet"]["port"] == "http"
    return spec


def test_probes(container: dict[str, Any]) -> None:
    startup = _http_probe(container, "startupProbe")
    assert startup["httpGet"]["path"] == "/readyz"
    # Budget for downloading (~14 GB) and loading SDXL on a fresh volume.
    budget = startup["failureThreshold"] * startup["periodSeconds"]
    assert 25 * 60 <= budget <= 60 * 60
    assert _http_probe(container, "livenessProbe")["httpGet"]["path"] == "/livez"
    assert _http_probe(container, "readinessProbe")["httpGet"]["path"] == "/readyz"


def test_weights_live_on_the_claimed_volume(
    deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = _resource("PersistentVolumeClaim")

    assert env["HF_HOME"].startswith(mounts["models"].rstrip("/") + "/")
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    bentofile = REPO / "bentofile.yaml"
    if bentofile.exists():
        image_env = {
            e["name"]: e.get("value") for e in yaml.safe_load(bentofile.read_text())["envs"]
        }
        assert env["HF_HOME"] == image_env["HF_HOME"]
        # LoRAs and the models picked per request sit on the volume too, where the image says.
        for name in (
            "SDXL_LORA_DIR",
            "SDXL_MODELS_DIR",
            "SDXL_UPSCALER_DIR",
            "SDXL_EMBEDDINGS_DIR",
            "SDXL_CONTROLNET_DIR",
        ):
            assert env[name] == image_env[name]
            assert env[name].startswith(mounts["models"].rstrip("/") + "/")


def test_gpu_preset_is_explicit(container: dict[str, Any]) -> None:
    # "auto" would fall back to the tiny preset on a node without a working GPU.
    assert {e["name"]: e["value"] for e in container["env"]}["SDXL_PRESET"] == "sdxl"


def test_every_sdxl_variable_is_a_setting(
    container: dict[str, Any], config: dict[str, str]
) -> None:
    names = {e["name"] for e in container["env"]} | set(config)
    fields = set(Settings.model_fields)
    unknown = {n for n in names if n.startswith("SDXL_") and n[5:].lower() not in fields}
    assert not unknown


def test_url_files_go_to_s3_with_credentials_from_a_secret(
    container: dict[str, Any], config: dict[str, str]
) -> None:
    store = S3FileStore.from_url(config["SDXL_FILES_URL"], 3600)
    assert store.bucket and store.prefix
    sources = container["envFrom"]
    assert {"configMapRef": {"name": _resource("ConfigMap")["metadata"]["name"]}} in sources
    secret_refs = [s["secretRef"]["name"] for s in sources if "secretRef" in s]
    example = _documents(K8S / "s3-credentials.example.yaml")[0]
    assert secret_refs == [example["metadata"]["name"]]
    assert set(example["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_service_exposes_9225_to_the_pods(deployment: dict[str, Any]) -> None:
    service = _resource("Service")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(9225, "http")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_autoscaler_follows_the_queue_metric(deployment: dict[str, Any]) -> None:
    hpa = _resource("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "sdxl_queue_images"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]

    # The adapter publishes that name, from the series the service exports.
    [rule] = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rule["name"]["as"] == name
    assert rule["seriesQuery"].startswith(f"{name}{{")
    metrics = ServiceMetrics(CollectorRegistry())
    metrics.set_queue_depth(3)
    assert f'\n{name}{{worker="1"}} 3.0\n' in generate_latest(metrics.registry).decode()
    # Several render workers in a pod: the adapter adds them up.
    assert rule["metricsQuery"].startswith("sum(")


def test_metrics_are_scraped_from_the_serving_port(deployment: dict[str, Any]) -> None:
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(DEFAULT_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_pod_runs_as_the_bento_user(deployment: dict[str, Any]) -> None:
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    # uid/gid of the `bentoml` user in images made by `bentoml containerize`.
    assert security["runAsUser"] == security["fsGroup"] == 1034
