"""Storage of the images answered as `url` (response_format=url).

Each image gets an unguessable id and lives for `SDXL_URL_TTL` seconds. The
local folder is the default (local.py); `SDXL_FILES_URL=s3://bucket/prefix`
shares the files between replicas behind one Kubernetes Service (s3.py, the
only module that imports boto3). `FileSweeper` deletes expired files.
"""

from __future__ import annotations

from ...settings import Settings
from .local import LocalFileStore
from .store import FileStore, StoredFile, is_valid_file_id, new_file_id
from .sweeper import SWEEP_INTERVAL_S, FileSweeper

__all__ = [
    "SWEEP_INTERVAL_S",
    "FileStore",
    "FileSweeper",
    "LocalFileStore",
    "StoredFile",
    "is_valid_file_id",
    "new_file_id",
    "open_file_store",
]


def open_file_store(settings: Settings) -> FileStore:
    """The store `settings` name: S3 when `SDXL_FILES_URL` is set, else the local folder."""
    if settings.files_url:
        # Lazily: importing boto3 takes about 0.2 s, wasted where S3 is not used.
        from .s3 import S3FileStore

        return S3FileStore.from_url(
            settings.files_url, settings.url_ttl, endpoint_url=settings.s3_endpoint_url
        )
    return LocalFileStore(settings.files_dir, settings.url_ttl)
