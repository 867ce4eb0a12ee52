"""The default file store: one local folder, `<id>` holds the bytes, `<id>.json` the metadata."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .store import StoredFile, is_valid_file_id, new_file_id


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

    def delete(self, file_id: str) -> None:
        if is_valid_file_id(file_id):
            self._delete(file_id)

    def _delete(self, file_id: str) -> None:
        for path in (self.folder / f"{file_id}.json", self.folder / file_id):
            path.unlink(missing_ok=True)
