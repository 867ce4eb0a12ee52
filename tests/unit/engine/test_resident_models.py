"""ResidentModels on its own: small real modules, the real metrics, a real catalog."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from sdxl_service.engine.render_batch import InvalidLora
from sdxl_service.engine.resident_models import ResidentModels, file_stamp
from sdxl_service.lora_catalog import LoraCatalog
from sdxl_service.metrics import ServiceMetrics


class Models:
    """A ResidentModels of Linear modules counted in the ControlNet metrics, its releases
    recorded, and what each load built."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        metrics = ServiceMetrics(self.registry)
        self.released: list[str] = []
        self.built: dict[str, torch.nn.Linear] = {}
        self.resident: ResidentModels[torch.nn.Linear] = ResidentModels(
            "ControlNet",
            "cpu",
            release=self.release,
            count_load=metrics.count_controlnet_load,
            count_resident=metrics.set_controlnets_resident,
        )

    def release(self, name: str, model: torch.nn.Linear) -> None:
        self.released.append(name)
        model.to("meta")

    def loader(self, name: str, width: int = 4) -> Callable[[], torch.nn.Linear]:
        def load() -> torch.nn.Linear:
            self.built[name] = torch.nn.Linear(width, width)
            return self.built[name]

        return load

    def get(self, name: str, stamp: object = 1, width: int = 4) -> torch.nn.Linear:
        return self.resident.get(name, stamp, self.loader(name, width))

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0

    def loads(self, outcome: str) -> float:
        return self.sample("sdxl_controlnet_loads_total", outcome=outcome)

    def gauge(self) -> float:
        return self.sample("sdxl_controlnets_resident", worker="1")


@pytest.fixture
def models() -> Models:
    return Models()


def test_names_are_least_recently_used_first_and_a_hit_loads_nothing(models: Models) -> None:
    a = models.get("a")
    models.get("b")
    models.get("c")
    assert models.resident.names() == ["a", "b", "c"]
    assert models.get("a") is a
    assert models.resident.names() == ["b", "c", "a"]
    assert models.loads("ok") == 3
    assert models.sample("sdxl_controlnet_load_seconds_count") == 3
    assert models.gauge() == 3
    # Looked at, not used: the order stays.
    assert models.resident["b"] is models.built["b"]
    assert models.resident.names() == ["b", "c", "a"]


def test_eviction_lets_the_least_recently_used_go_never_a_kept_one(models: Models) -> None:
    for name in ("a", "b", "c", "d"):
        models.get(name)
    models.get("a")  # b, c, d, a
    models.resident.evict(keep={"b"}, capacity=2)
    assert models.resident.names() == ["b", "a"]
    assert models.released == ["c", "d"]
    assert models.gauge() == 2
    # The released modules' parameters are gone from the CPU.
    assert models.built["c"].weight.device.type == "meta"
    assert models.built["b"].weight.device.type == "cpu"


def test_a_kept_set_larger_than_the_capacity_stays_whole(models: Models) -> None:
    for name in ("a", "b", "c"):
        models.get(name)
    models.resident.evict(keep={"a", "b", "c"}, capacity=1)
    assert models.resident.names() == ["a", "b", "c"]
    assert models.released == []
    models.resident.evict(keep={"c"}, capacity=1)
    assert models.resident.names() == ["c"]
    assert models.released == ["a", "b"]
    assert models.gauge() == 1


def test_a_changed_stamp_unloads_the_old_model_and_loads_the_new(models: Models) -> None:
    old = models.get("a", stamp=(1, 10), width=4)
    models.get("b")
    new = models.get("a", stamp=(2, 10), width=8)
    assert new is not old
    assert new.in_features == 8
    assert old.weight.device.type == "meta"
    assert models.released == ["a"]
    assert models.resident.names() == ["b", "a"]
    assert models.loads("ok") == 3
    assert models.gauge() == 2
    assert models.get("a", stamp=(2, 10)) is new


def test_a_failed_load_leaves_nothing_and_counts_failed(models: Models) -> None:
    models.get("a", stamp=1)
    models.get("b")

    def damaged() -> torch.nn.Linear:
        raise ValueError("its weights do not fit")

    with pytest.raises(ValueError, match="do not fit"):
        models.resident.get("a", 2, damaged)  # replaced by a damaged file
    assert models.resident.names() == ["b"]
    assert models.released == ["a"]
    assert models.loads("failed") == 1
    assert models.loads("ok") == 2
    assert models.gauge() == 1
    with pytest.raises(ValueError):
        models.resident.get("c", 1, damaged)
    assert models.resident.names() == ["b"]
    assert models.loads("failed") == 2
    assert models.gauge() == 1


def test_the_release_hook_runs_once_per_unload_and_the_model_is_freed(models: Models) -> None:
    models.get("a")
    models.get("b")
    freed = weakref.ref(models.built.pop("a"))
    models.resident.unload("a")
    gc.collect()
    assert freed() is None
    assert models.released == ["a"]
    assert models.gauge() == 1
    models.resident.evict(keep=set(), capacity=0)
    models.resident.evict(keep=set(), capacity=0)
    assert models.released == ["a", "b"]
    assert models.resident.names() == []
    assert models.gauge() == 0
    with pytest.raises(KeyError):
        models.resident.unload("b")
    assert models.released == ["a", "b"]


def test_the_gauge_follows_every_step(models: Models) -> None:
    steps = []
    models.get("a")
    steps.append(models.gauge())
    models.get("b")
    steps.append(models.gauge())
    models.get("a")  # a hit
    steps.append(models.gauge())
    models.get("b", stamp=2)  # replaced: one out, one in
    steps.append(models.gauge())
    models.resident.evict(keep={"b"}, capacity=1)
    steps.append(models.gauge())
    models.resident.unload("b")
    steps.append(models.gauge())
    assert steps == [1, 2, 2, 2, 1, 0]


def test_a_hit_is_counted_through_its_callback() -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    resident: ResidentModels[torch.nn.Linear] = ResidentModels(
        "LoRA", "cpu", count_load=metrics.count_lora_load, count_hit=metrics.count_lora_cache_hit
    )
    for _ in range(3):
        resident.get("a", 1, lambda: torch.nn.Linear(2, 2))
    assert registry.get_sample_value("sdxl_lora_cache_hits_total") == 2
    assert registry.get_sample_value("sdxl_lora_loads_total", {"outcome": "ok"}) == 1


def test_an_entry_missing_or_with_a_problem_is_refused(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics(registry)
    resident: ResidentModels[torch.nn.Linear] = ResidentModels(
        "LoRA", "cpu", count_load=metrics.count_lora_load
    )
    (tmp_path / "damaged.safetensors").write_bytes(b"not a safetensors file")
    catalog = LoraCatalog(tmp_path)

    def failed() -> float:
        return registry.get_sample_value("sdxl_lora_loads_total", {"outcome": "failed"}) or 0

    with pytest.raises(InvalidLora, match=r"^LoRA 'gone' is not in the LoRA folder \(any more\)$"):
        resident.entry(catalog, "gone", InvalidLora)
    assert failed() == 0
    with pytest.raises(InvalidLora, match=r"^LoRA 'damaged' cannot be used: "):
        resident.entry(catalog, "damaged", InvalidLora)
    assert failed() == 1
    with pytest.raises(InvalidLora, match="'damaged' cannot be used"):
        resident.entry(catalog, "damaged", InvalidLora, problem_counts_as_failed=False)
    assert failed() == 1


def test_a_file_stamp_changes_with_the_file_and_is_none_once_it_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"1234")
    first = file_stamp(path)
    assert first is not None and first[1] == 4
    os.utime(path, ns=(first[0] + 1_000_000, first[0] + 1_000_000))
    assert file_stamp(path) != first
    path.unlink()
    assert file_stamp(path) is None
