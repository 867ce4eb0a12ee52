"""What every file store is: the `FileStore` protocol, `StoredFile` and the file ids.

A file's id is its only secret: 32 url-safe random bytes (256 bits), so a url
answer can be shared without anyone guessing the others.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Protocol

# token_urlsafe(32): 32 random bytes, 43 base64url characters without padding.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}$")


def new_file_id() -> str:
    return secrets.token_urlsafe(32)


def is_valid_file_id(file_id: str) -> bool:
    """Whether `file_id` could be one of ours; anything else never reaches a path or key."""
    return bool(_ID_PATTERN.match(file_id))


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    content_type: str
    expires_at: float  # unix seconds


class FileStore(Protocol):
    def put(self, data: bytes, content_type: str) -> str:
        """Stores the bytes and returns their new id."""

    def get(self, file_id: str) -> StoredFile | None:
        """The file, or None when it never existed or has expired."""

    def purge_expired(self) -> int:
        """Deletes expired files; returns how many."""

    def delete(self, file_id: str) -> None:
        """Deletes the file now (a deleted image job's images); nothing when it is gone."""
