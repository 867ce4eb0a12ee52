from __future__ import annotations

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from sdxl_service.metrics import STAGES, ServiceMetrics


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_each_method_updates_its_metric(registry: CollectorRegistry) -> None:
    metrics = ServiceMetrics(registry)
    metrics.set_queue_depth(5)
    metrics.set_requests_in_flight(2)
    metrics.count_images(3)
    metrics.count_images(1)
    metrics.observe_batch(4)
    metrics.reject("queue_full")
    metrics.reject("queue_full")
    metrics.reject("timeout")
    for stage in STAGES:
        metrics.observe_stage(stage, 0.2)

    value = registry.get_sample_value
    one = {"worker": "1"}
    assert value("sdxl_queue_images", one) == 5
    assert value("sdxl_requests_in_flight", one) == 2
    assert value("sdxl_images_generated_total", one) == 4
    assert value("sdxl_batch_images_bucket", {"le": "3.0", **one}) == 0
    assert value("sdxl_batch_images_bucket", {"le": "4.0", **one}) == 1
    assert value("sdxl_rejected_total", {"reason": "queue_full"}) == 2
    assert value("sdxl_rejected_total", {"reason": "timeout"}) == 1
    for stage in ("queue_wait", "base", "refiner", "decode", "encode"):
        assert value("sdxl_stage_seconds_sum", {"stage": stage}) == pytest.approx(0.2)


def test_batch_histogram_has_one_bucket_per_size_up_to_16(registry: CollectorRegistry) -> None:
    ServiceMetrics(registry).observe_batch(1)
    text = generate_latest(registry).decode()
    bounds = [
        line.split('le="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("sdxl_batch_images_bucket")
    ]
    assert bounds == [f"{n}.0" for n in range(1, 17)] + ["+Inf"]


def test_unknown_stage_is_refused(registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        ServiceMetrics(registry).observe_stage("upscale", 1.0)


def test_many_instances_share_one_set_of_collectors() -> None:
    # A second registration of the same name would raise in prometheus_client.
    first, second = ServiceMetrics(), ServiceMetrics()
    one = {"worker": "1"}
    before = REGISTRY.get_sample_value("sdxl_images_generated_total", one) or 0
    first.count_images(1)
    second.count_images(2)
    assert REGISTRY.get_sample_value("sdxl_images_generated_total", one) == before + 3


def test_render_worker_metrics_are_labelled_by_worker(registry: CollectorRegistry) -> None:
    first, second = ServiceMetrics(registry, worker=1), ServiceMetrics(registry, worker=2)
    first.count_images(2)
    second.count_images(5)
    second.set_queue_depth(3)
    first.count_render_worker_start()
    value = registry.get_sample_value
    assert value("sdxl_images_generated_total", {"worker": "1"}) == 2
    assert value("sdxl_images_generated_total", {"worker": "2"}) == 5
    assert value("sdxl_queue_images", {"worker": "2"}) == 3
    assert value("sdxl_render_worker_starts_total", {"worker": "1"}) == 1


def test_observe_stage_fits_the_engine_stage_observer_signature(
    registry: CollectorRegistry,
) -> None:
    observer = ServiceMetrics(registry).observe_stage
    observer("base", 1.5)
    observer(stage="refiner", seconds=0.5)
    assert registry.get_sample_value("sdxl_stage_seconds_count", {"stage": "base"}) == 1
    assert registry.get_sample_value("sdxl_stage_seconds_count", {"stage": "refiner"}) == 1
