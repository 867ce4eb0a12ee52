"""A folder of files read as named entries, read again whenever the folder or one of its files
changes: new LoRAs and models are found without a restart (lora_catalog, model_catalog)."""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path
from typing import Generic, TypeVar

Entry = TypeVar("Entry")

# A name is a file name without its extension: no path separators, no leading dot (so no
# `..`), no spaces.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)


def is_valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


class FolderCatalog(Generic[Entry]):
    """The entries of one folder by name: `_candidates` says which files are entries and
    `_read` reads one; both are the subclass's."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] | None = None
        self._entries: dict[str, Entry] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._hash_lock = threading.Lock()

    def snapshot(self) -> dict[str, Entry]:
        """Every entry by name as the folder is now (one pass over its files): a request reads
        the folder once and looks its names up in this."""
        return dict(self._current())

    def find(self, name: str) -> Entry | None:
        """The entry called `name`, usable or not (an entry's `problem` says why not)."""
        if not is_valid_name(name):
            return None
        return self._current().get(name)

    def _current(self) -> dict[str, Entry]:
        stamp = self._folder_stamp()
        with self._lock:
            if stamp != self._stamp:
                self._entries = {
                    name: self._read(name, path) for name, path in self._candidates().items()
                }
                self._stamp = stamp
            return self._entries

    def _candidates(self) -> dict[str, Path]:
        raise NotImplementedError

    def file_short_hash(self, path: Path) -> str | None:
        """The first 12 hex digits of the file's SHA-256, as AUTOMATIC1111's infotext names a
        LoRA (`Lora hashes`) or an embedding (`TI hashes`); computed once per file version
        (path, size, mtime); None when the file is gone."""
        try:
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            with self._hash_lock:
                known = self._hashes.get(key)
            if known is None:
                with path.open("rb") as file:
                    known = hashlib.file_digest(file, "sha256").hexdigest()[:12]
                with self._hash_lock:
                    self._hashes[key] = known
        except OSError:
            return None
        return known

    def _read(self, name: str, path: Path) -> Entry:
        raise NotImplementedError

    def _watched(self, name: str, path: Path) -> tuple[Path, ...]:
        """The files whose change makes entry `name` be read again."""
        return (path,)

    def _folder_stamp(self) -> tuple[float, ...]:
        # The folder's own mtime changes when a file is added or removed; the files'
        # cover one replaced in place.
        if self.folder is None or not self.folder.is_dir():
            return ()
        stamps = [self.folder.stat().st_mtime]
        for name, path in self._candidates().items():
            for part in self._watched(name, path):
                try:
                    stat = part.stat()
                except OSError:
                    continue
                stamps += [stat.st_mtime, float(stat.st_size)]
        return tuple(stamps)
