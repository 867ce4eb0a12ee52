"""Prometheus metrics of the service, served by BentoML on `/metrics`.

BentoML 1.4 (`bentoml serve`) starts every service process with
`PROMETHEUS_MULTIPROC_DIR` set to one directory shared by all services, and its
`/metrics` route aggregates every file in it with `MultiProcessCollector`. So
plain `prometheus_client` objects work (`bentoml.metrics` is a deprecated alias
of it), and what the pipeline process records shows up on the HTTP service's
`/metrics` too. In that mode a gauge needs a `multiprocess_mode`; "livesum"
drops the values of worker processes that died.

Collectors are created once per registry and process: prometheus_client
refuses to register a name twice, and tests build many `ServiceMetrics`.
"""

from __future__ import annotations

import threading
import weakref

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "sdxl"

# Stages of one image, in the order it goes through them; engine.py reports
# vae_encode (edits' input images)/base/refiner/decode, the batcher
# queue_wait, the HTTP service encode.
STAGES = (
    "queue_wait",
    "vae_encode",
    "base",
    "refiner",
    "hires_upscale",
    "decode",
    "safety_check",
    "encode",
)

LORA_LOAD_OUTCOMES = ("ok", "failed")
MODEL_LOAD_OUTCOMES = ("ok", "failed")

BATCH_BUCKETS = tuple(float(n) for n in range(1, 17))
# From a 64x64 tiny-preset image (ms) to a queued SDXL request (minutes).
SECONDS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class _Collectors:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_images = Gauge(
            f"{PREFIX}_queue_images",
            "Images waiting in the batch queue of a render worker.",
            ["worker"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.requests_in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Generation requests a render worker holds and has not answered yet.",
            ["worker"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.images_generated = Counter(
            f"{PREFIX}_images_generated",
            "Images rendered, by render worker.",
            ["worker"],
            registry=registry,
        )
        self.images_flagged = Counter(
            f"{PREFIX}_images_flagged",
            "Images the safety checker (SDXL_SAFETY_CHECKER) flagged and withheld, by render "
            "worker.",
            ["worker"],
            registry=registry,
        )
        self.batch_images = Histogram(
            f"{PREFIX}_batch_images",
            "Images per pipeline call, by render worker.",
            ["worker"],
            registry=registry,
            buckets=BATCH_BUCKETS,
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_seconds",
            "Seconds one image (queue_wait, encode) or one pipeline call "
            "(vae_encode, base, refiner, decode, safety_check) spent in a stage.",
            ["stage"],
            registry=registry,
            buckets=SECONDS_BUCKETS,
        )
        self.render_worker_starts = Counter(
            f"{PREFIX}_render_worker_starts",
            "Render worker processes started; past one per worker, each is a restart after a "
            "crash.",
            ["worker"],
            registry=registry,
        )
        self.render_calls_lost = Counter(
            f"{PREFIX}_render_calls_lost",
            "Requests whose render worker died while it held their images.",
            registry=registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_rejected",
            "Generation requests answered without images, by reason.",
            ["reason"],
            registry=registry,
        )
        self.lora_loads = Counter(
            f"{PREFIX}_lora_loads",
            "LoRA adapters loaded into the base pipeline, by outcome (ok, failed).",
            ["outcome"],
            registry=registry,
        )
        self.lora_load_seconds = Histogram(
            f"{PREFIX}_lora_load_seconds",
            "Seconds one LoRA adapter took to load (the batch that needs it waits).",
            registry=registry,
            buckets=SECONDS_BUCKETS,
        )
        self.model_loads = Counter(
            f"{PREFIX}_model_loads",
            "Models of SDXL_MODELS_DIR loaded by a render worker, by outcome (ok, failed).",
            ["outcome"],
            registry=registry,
        )
        self.model_load_seconds = Histogram(
            f"{PREFIX}_model_load_seconds",
            "Seconds one model of SDXL_MODELS_DIR took to load (the batch that needs it waits).",
            registry=registry,
            buckets=SECONDS_BUCKETS,
        )
        self.models_resident = Gauge(
            f"{PREFIX}_models_resident",
            "Models of SDXL_MODELS_DIR a render worker holds loaded, besides its default pair.",
            ["worker"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.controlnet_loads = Counter(
            f"{PREFIX}_controlnet_loads",
            "ControlNet models of SDXL_CONTROLNET_DIR loaded by a render worker, by outcome "
            "(ok, failed).",
            ["outcome"],
            registry=registry,
        )
        self.controlnet_load_seconds = Histogram(
            f"{PREFIX}_controlnet_load_seconds",
            "Seconds one ControlNet model took to load (the batch that needs it waits).",
            registry=registry,
            buckets=SECONDS_BUCKETS,
        )
        self.controlnets_resident = Gauge(
            f"{PREFIX}_controlnets_resident",
            "ControlNet models a render worker holds loaded (at most SDXL_CONTROL_CACHE).",
            ["worker"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.lora_cache_hits = Counter(
            f"{PREFIX}_lora_cache_hits",
            "LoRA adapters a batch found already loaded.",
            registry=registry,
        )


_lock = threading.Lock()
# Weak keys: a test's registry (and its collectors) goes away with the test.
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Collectors] = (
    weakref.WeakKeyDictionary()
)


def _collectors_for(registry: CollectorRegistry) -> _Collectors:
    with _lock:
        collectors = _by_registry.get(registry)
        if collectors is None:
            collectors = _by_registry[registry] = _Collectors(registry)
        return collectors


class ServiceMetrics:
    """The service's metrics; cheap to create, any number of times."""

    def __init__(self, registry: CollectorRegistry | None = None, *, worker: int = 1) -> None:
        # A private registry gives a test fresh counters; the default one is
        # what /metrics serves.
        self.registry = registry if registry is not None else REGISTRY
        self._c = _collectors_for(self.registry)
        # BentoML's index of the render worker these metrics belong to.
        self.worker = str(worker)

    def observe_stage(self, stage: str, seconds: float) -> None:
        # Unknown stages are a programming error; refusing them keeps the
        # label's cardinality fixed.
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self._c.stage_seconds.labels(stage=stage).observe(seconds)

    def observe_batch(self, n: int) -> None:
        self._c.batch_images.labels(worker=self.worker).observe(n)

    def count_images(self, n: int) -> None:
        self._c.images_generated.labels(worker=self.worker).inc(n)

    def count_flagged(self, n: int) -> None:
        self._c.images_flagged.labels(worker=self.worker).inc(n)

    def reject(self, reason: str) -> None:
        self._c.rejected.labels(reason=reason).inc()

    def count_render_worker_start(self) -> None:
        self._c.render_worker_starts.labels(worker=self.worker).inc()

    def count_render_call_lost(self) -> None:
        self._c.render_calls_lost.inc()

    def count_lora_load(self, outcome: str, seconds: float | None = None) -> None:
        if outcome not in LORA_LOAD_OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {LORA_LOAD_OUTCOMES}")
        self._c.lora_loads.labels(outcome=outcome).inc()
        if seconds is not None:
            self._c.lora_load_seconds.observe(seconds)

    def count_model_load(self, outcome: str, seconds: float | None = None) -> None:
        if outcome not in MODEL_LOAD_OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {MODEL_LOAD_OUTCOMES}")
        self._c.model_loads.labels(outcome=outcome).inc()
        if seconds is not None:
            self._c.model_load_seconds.observe(seconds)

    def set_models_resident(self, n: int) -> None:
        self._c.models_resident.labels(worker=self.worker).set(n)

    def count_controlnet_load(self, outcome: str, seconds: float | None = None) -> None:
        if outcome not in MODEL_LOAD_OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {MODEL_LOAD_OUTCOMES}")
        self._c.controlnet_loads.labels(outcome=outcome).inc()
        if seconds is not None:
            self._c.controlnet_load_seconds.observe(seconds)

    def set_controlnets_resident(self, n: int) -> None:
        self._c.controlnets_resident.labels(worker=self.worker).set(n)

    def count_lora_cache_hit(self) -> None:
        self._c.lora_cache_hits.inc()

    def set_queue_depth(self, n: int) -> None:
        self._c.queue_images.labels(worker=self.worker).set(n)

    def set_requests_in_flight(self, n: int) -> None:
        self._c.requests_in_flight.labels(worker=self.worker).set(n)
