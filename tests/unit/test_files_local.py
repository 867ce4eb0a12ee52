"""LocalFileStore: the default store, same behaviours as the S3 one."""

from __future__ import annotations

import time
from pathlib import Path

from sdxl_service.files import LocalFileStore, is_valid_file_id, new_file_id

PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 100


def test_put_get_roundtrip_keeps_bytes_and_content_type(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path / "files", ttl_seconds=60)
    before = time.time()
    file_id = store.put(PNG, "image/png")

    stored = store.get(file_id)

    assert stored is not None
    assert stored.data == PNG
    assert stored.content_type == "image/png"
    assert before + 60 <= stored.expires_at <= time.time() + 60


def test_new_ids_are_valid_and_distinct() -> None:
    ids = {new_file_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(is_valid_file_id(i) for i in ids)


def test_expired_file_is_none_and_deleted(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path, ttl_seconds=-1)
    file_id = store.put(PNG, "image/webp")

    assert store.get(file_id) is None
    assert list(tmp_path.iterdir()) == []


def test_bogus_and_unknown_ids_are_none(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path / "files", ttl_seconds=60)
    (tmp_path / "secret.json").write_text('{"content_type": "x", "expires_at": 9e99}')
    (tmp_path / "secret").write_bytes(b"outside the store")

    assert store.get("../secret") is None
    assert store.get("") is None
    assert store.get("x" * 44) is None
    assert store.get(new_file_id()) is None


def test_half_written_file_is_none(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path, ttl_seconds=60)
    file_id = new_file_id()
    # Data present, metadata not yet: the writer has not finished.
    (tmp_path / file_id).write_bytes(PNG)

    assert store.get(file_id) is None


def test_purge_removes_only_expired(tmp_path: Path) -> None:
    fresh = LocalFileStore(tmp_path, ttl_seconds=3600)
    stale = LocalFileStore(tmp_path, ttl_seconds=-1)
    kept = [fresh.put(PNG, "image/png") for _ in range(3)]
    for _ in range(2):
        stale.put(PNG, "image/png")

    assert fresh.purge_expired() == 2

    assert {p.name for p in tmp_path.iterdir()} == {n for i in kept for n in (i, f"{i}.json")}
    assert all(fresh.get(i) is not None for i in kept)
    assert fresh.purge_expired() == 0
