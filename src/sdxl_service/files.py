"""Storage of the images answered as `url` (response_format=url).

Each image gets an unguessable id and lives for `SDXL_URL_TTL` seconds. The
local folder is the default; `SDXL_FILES_URL=s3://bucket/prefix` shares the
files between replicas behind one Kubernetes Service (see files_s3.py).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .settings import Settings

# 32 url-safe random bytes: 256 bits, not guessable.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}$")


def new_file_id() -> str:
    return secrets.token_urlsafe(32)


def is_valid_file_id(file_id: str) -> bool:
    return bool(_ID_PATTERN.match(file_id))


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    content_type: str
    expires_at: float


class FileStore(Protocol):
    def put(self, data: bytes, content_type: str) -> str:
        """Stores the bytes and returns their new id."""

    def get(self, file_id: str) -> StoredFile | None:
        """The file, or None when it never existed or has expired."""

    def purge_expired(self) -> int:
        """Deletes expired files; returns how many."""


class LocalFileStore:
    """Files in one folder: `<id>` holds the bytes, `<id>.json` the metadata."""

    def __init__(self, folder: Path, ttl_seconds: float) -> None:
        self.folder = folder
        self.ttl_seconds = ttl_seconds
        self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, content_type: str) -> str:
        file_id = new_file_id()
        meta = {"content_type": content_type, "expires_at": time.time() + self.ttl_seconds}
        (self.folder / file_id).write_bytes(data)
        # Metadata last: a reader that finds it finds the data complete.
        (self.folder / f"{file_id}.json").write_text(json.dumps(meta))
        return file_id

    def get(self, file_id: str) -> StoredFile | None:
        if not is_valid_file_id(file_id):
            return None
        try:
            meta = json.loads((self.folder / f"{file_id}.json").read_text())
            data = (self.folder / file_id).read_bytes()
        except (FileNotFoundError, ValueError):
            return None
        if meta["expires_at"] <= time.time():
            self._delete(file_id)
            return None
        return StoredFile(data, meta["content_type"], meta["expires_at"])

    def purge_expired(self) -> int:
        now = time.time()
        purged = 0
        for meta_path in self.folder.glob("*.json"):
            try:
                expired = json.loads(meta_path.read_text())["expires_at"] <= now
            except (FileNotFoundError, ValueError, KeyError):
                continue
            if expired:
                self._delete(meta_path.stem)
                purged += 1
        return purged

    def _delete(self, file_id: str) -> None:
        for path in (self.folder / f"{file_id}.json", self.folder / file_id):
            path.unlink(missing_ok=True)


def open_file_store(settings: Settings) -> FileStore:
    if settings.files_url:
        from .files_s3 import S3FileStore

        return S3FileStore.from_url(
            settings.files_url, settings.url_ttl, endpoint_url=settings.s3_endpoint_url
        )
    return LocalFileStore(settings.files_dir, settings.url_ttl)
