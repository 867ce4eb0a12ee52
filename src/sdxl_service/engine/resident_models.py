"""Models of one kind kept loaded by name (ControlNets, IP-Adapters, LoRAs, upscalers): loaded
on first use, the least recently used let go past a capacity, reloaded when their file changes.

A kind brings only what is its own: how to load one (each `get`'s `load`, raising the kind's
error) and what letting one go means besides dropping it (`release`). Not thread-safe: the
engine's kinds run on the render thread alone; the upscalers lock around theirs.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from ..folder_catalog import FolderCatalog
from .devices import free_memory

logger = logging.getLogger(__name__)

Model = TypeVar("Model")


class CatalogEntry(Protocol):
    @property
    def problem(self) -> str | None: ...


Entry = TypeVar("Entry", bound=CatalogEntry)


def file_stamp(path: Path) -> tuple[int, int] | None:
    """The file's mtime_ns and size (a replaced file has another), None when it is gone."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _nothing(*_: Any) -> None:
    pass


class ResidentModels(Generic[Model]):
    """The models of one `kind` (the name its logs and errors use) on `device`, by name.

    `release(name, model)` runs once for each model let go (evicted, replaced, unloaded),
    before its memory is given back. The metrics callbacks get each load's outcome ("ok" with
    its seconds, or "failed"), the number resident after each change, and each reuse.
    """

    def __init__(
        self,
        kind: str,
        device: str,
        *,
        release: Callable[[str, Model], None] | None = None,
        count_load: Callable[[str, float | None], None] | None = None,
        count_resident: Callable[[int], None] | None = None,
        count_hit: Callable[[], None] | None = None,
    ) -> None:
        self.kind = kind
        self.device = device
        self._release = release or _nothing
        self._count_load = count_load or _nothing
        self._count_resident = count_resident or _nothing
        self._count_hit = count_hit or _nothing
        self._models: OrderedDict[str, tuple[Hashable, Model]] = OrderedDict()

    def names(self) -> list[str]:
        """The resident names, least recently used first."""
        return list(self._models)

    def __getitem__(self, name: str) -> Model:
        """The resident model `name`, its place in the order left as it is."""
        return self._models[name][1]

    def entry(
        self,
        catalog: FolderCatalog[Entry],
        name: str,
        error: type[Exception],
        *,
        problem_counts_as_failed: bool = True,
    ) -> Entry:
        """`name`'s usable entry in `catalog`; `error` when it is not there or has a problem
        (a failed load, unless told otherwise: the IP-Adapters never counted those)."""
        found = catalog.find(name)
        if found is None:
            raise error(f"{self.kind} '{name}' is not in the {self.kind} folder (any more)")
        if found.problem is not None:
            if problem_counts_as_failed:
                self._count_load("failed", None)
            raise error(f"{self.kind} '{name}' cannot be used: {found.problem}")
        return found

    def get(self, name: str, stamp: Hashable, load: Callable[[], Model]) -> Model:
        """The model `name` as of `stamp`: the resident one, now the most recently used, or
        `load()`'s (one of another stamp let go first). When `load` raises, nothing of it
        stays: the failure is counted, the memory given back, the error raised on."""
        held = self._models.get(name)
        if held is not None and held[0] == stamp:
            self._models.move_to_end(name)
            self._count_hit()
            return held[1]
        if held is not None:
            self.unload(name)
        started = time.perf_counter()
        try:
            model = load()
        except Exception as exc:
            self._count_load("failed", None)
            free_memory(self.device)
            # The kind's error says what; what it was made from, where it kept that, says why.
            logger.warning("%s %s failed to load: %s", self.kind, name, exc.__cause__ or exc)
            raise
        seconds = time.perf_counter() - started
        self._count_load("ok", seconds)
        logger.info("%s %s loaded in %.2f s", self.kind, name, seconds)
        self._models[name] = (stamp, model)
        self._count_resident(len(self._models))
        return model

    def evict(self, keep: Collection[str], capacity: int) -> None:
        """Let the least recently used go down to `capacity`, never one in `keep`: a batch's
        own stay even past it (they must all be loaded at once)."""
        for name in list(self._models):
            if len(self._models) <= capacity:
                break
            if name not in keep:
                self.unload(name)

    def unload(self, name: str) -> None:
        """Let `name` go: its `release`, then the memory it held given back."""
        _, model = self._models.pop(name)
        self._release(name, model)
        del model
        free_memory(self.device)
        self._count_resident(len(self._models))
        logger.info("%s %s unloaded", self.kind, name)
