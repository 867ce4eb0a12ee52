"""worker_plan: which GPUs SDXL_GPUS picks, how many workers, and each worker's device."""

from __future__ import annotations

import pytest

from sdxl_service.render import worker_plan
from sdxl_service.render.worker_plan import (
    CUDA_VISIBLE_DEVICES,
    GpuSelectionError,
    WorkerPlan,
    plan_workers,
    select_gpus,
    visible_gpus,
)

FOUR = [0, 1, 2, 3]


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with 4 GPUs and nothing pinned (what NVML would report)."""
    real = worker_plan.visible_gpus
    monkeypatch.setattr(
        worker_plan,
        "visible_gpus",
        lambda environ: real(environ) if CUDA_VISIBLE_DEVICES in environ else [0, 1, 2, 3],
    )


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("all", FOUR),
        (" ALL ", FOUR),
        ("2", [0, 1]),
        ("4", FOUR),
        ("0", []),
        ("1,3", [1, 3]),
        ("3, 1", [3, 1]),
        ("1,1,2", [1, 2]),
    ],
)
def test_select_gpus(setting: str, expected: list[int]) -> None:
    assert select_gpus(setting, FOUR) == expected


def test_select_all_without_gpus_is_none() -> None:
    assert select_gpus("all", []) == []


@pytest.mark.parametrize(
    ("setting", "visible", "named"),
    [("5", FOUR, "only 4 GPU(s)"), ("1", [], "only 0 GPU(s)"), ("2,4,7", FOUR, "no GPU 4, 7")],
)
def test_select_gpus_out_of_range_names_the_setting(
    setting: str, visible: list[int], named: str
) -> None:
    with pytest.raises(GpuSelectionError) as raised:
        select_gpus(setting, visible)
    message = str(raised.value)
    assert "SDXL_GPUS" in message and named in message


def test_a_missing_index_lists_the_visible_gpus() -> None:
    with pytest.raises(GpuSelectionError, match=r"visible: 0, 1\)"):
        select_gpus("0,2", [0, 1])
    with pytest.raises(GpuSelectionError, match=r"visible: none"):
        select_gpus("0,1", [])


@pytest.mark.parametrize(
    ("pinned", "expected"),
    [
        ("", []),
        ("-1", []),
        ("0", [0]),
        ("3", [0]),
        ("2,3", [0, 1]),
        (" 5 , 7 ,", [0, 1]),
        ("0,-1,2", [0]),
        ("1,abc,2", [0]),
    ],
)
def test_visible_gpus_counts_the_pinned_devices(pinned: str, expected: list[int]) -> None:
    # Pinned devices are renumbered 0..N-1 in the process; an invalid entry
    # hides it and every later one.
    assert visible_gpus({CUDA_VISIBLE_DEVICES: pinned}) == expected


def test_visible_gpus_accepts_gpu_uuids() -> None:
    pinned = "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6,GPU-1f2e3d4c-0000-1111-2222-333344445555"
    assert visible_gpus({CUDA_VISIBLE_DEVICES: pinned}) == [0, 1]


def test_plan_pins_a_picked_list_and_hands_all_to_the_workers(four_gpus: None) -> None:
    environ: dict[str, str] = {"SDXL_GPUS": "1,3"}
    plan = plan_workers("1,3", None, environ)
    assert environ == {CUDA_VISIBLE_DEVICES: "1,3", "SDXL_GPUS": "all"}
    # Renumbered as the pinned process sees them.
    assert plan == WorkerPlan(gpus=(0, 1), workers=2)
    # A process started from this one (same environ) plans the same devices.
    assert plan_workers(environ["SDXL_GPUS"], None, environ) == plan
    assert environ == {CUDA_VISIBLE_DEVICES: "1,3", "SDXL_GPUS": "all"}


def test_plan_pins_the_first_n(four_gpus: None) -> None:
    environ: dict[str, str] = {}
    plan = plan_workers("2", None, environ)
    assert environ[CUDA_VISIBLE_DEVICES] == "0,1"
    assert plan.gpus == (0, 1) and plan.workers == 2


def test_plan_with_all_gpus_pins_every_one(four_gpus: None) -> None:
    environ: dict[str, str] = {}
    plan = plan_workers("all", None, environ)
    assert environ[CUDA_VISIBLE_DEVICES] == "0,1,2,3"
    assert plan.gpus == (0, 1, 2, 3) and plan.workers == 4


def test_plan_keeps_an_existing_pin() -> None:
    environ = {CUDA_VISIBLE_DEVICES: "2,3,5"}
    plan = plan_workers("0,2", None, environ)
    assert environ == {CUDA_VISIBLE_DEVICES: "2,3,5"}
    assert plan.gpus == (0, 2) and plan.workers == 2
    with pytest.raises(GpuSelectionError, match="SDXL_GPUS"):
        plan_workers("4", None, environ)


def test_plan_without_gpus_is_one_worker_and_pins_nothing() -> None:
    environ = {CUDA_VISIBLE_DEVICES: ""}
    plan = plan_workers("all", None, environ)
    assert plan == WorkerPlan(gpus=(), workers=1)
    assert environ == {CUDA_VISIBLE_DEVICES: ""}
    assert plan.device_for(1) is None and plan.device_for(3) is None
    assert plan.gpu_resources == 1


def test_explicit_workers_win(four_gpus: None) -> None:
    assert plan_workers("2", 5, {}).workers == 5
    assert plan_workers("all", 1, {}).workers == 1
    assert plan_workers("all", 3, {CUDA_VISIBLE_DEVICES: "-1"}).workers == 3


def test_device_for_is_round_robin_over_the_picked_gpus() -> None:
    plan = WorkerPlan(gpus=(0, 1, 2), workers=5)
    assert [plan.device_for(i) for i in range(1, 6)] == [
        "cuda:0",
        "cuda:1",
        "cuda:2",
        "cuda:0",
        "cuda:1",
    ]
    assert WorkerPlan(gpus=(1, 3), workers=2).device_for(2) == "cuda:3"


@pytest.mark.parametrize(("gpus", "resources"), [((), 1), ((0,), 1), ((0, 1, 2), 3)])
def test_gpu_resources_is_at_least_one(gpus: tuple[int, ...], resources: int) -> None:
    assert WorkerPlan(gpus=gpus, workers=1).gpu_resources == resources
