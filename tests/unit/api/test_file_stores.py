"""The file-store contract, run against every store: the local folder and S3.

S3 is moto in server mode on a loopback port, a real S3 HTTP API. Each backend
says how it lays files out (`entries_of`) so the contract can check what a put,
an expiry or a purge leaves behind; what only S3 has (prefixes, s3:// urls) is
tested at the end.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.client import BaseClient
from moto.server import ThreadedMotoServer

from sdxl_service.api.files import (
    FileStore,
    LocalFileStore,
    is_valid_file_id,
    new_file_id,
    open_file_store,
)
from sdxl_service.api.files.s3 import EXPIRES_AT_KEY, S3FileStore
from sdxl_service.settings import Settings

BUCKET = "sdxl-files"
PREFIX = "images"
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 100
FAR_FUTURE = 9e99


@dataclass
class Backend:
    """One kind of store, and a look at what it holds behind the store's back."""

    open: Callable[[float], FileStore]  # a store with this TTL; all share one place
    entries: Callable[[], set[str]]  # everything in that place (folder names, bucket keys)
    entries_of: Callable[[str], set[str]]  # what one stored file occupies
    # A file with a valid id, written without the store's metadata: half-written
    # (local) or not written by a store (S3).
    write_without_metadata: Callable[[str], None]
    # A readable, unexpired file called `name` just outside the store's place.
    write_outside: Callable[[str], None]
    # Something that is not a file of the store, beside its files: purge leaves it.
    write_foreign: Callable[[], set[str]]


# ---- the local folder -----------------------------------------------------------


def local_backend(tmp_path: Path) -> Backend:
    folder = tmp_path / "files"

    def write_outside(name: str) -> None:
        meta = {"content_type": "image/png", "expires_at": FAR_FUTURE}
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
        (tmp_path / name).write_bytes(b"outside the store")

    def write_foreign() -> set[str]:
        (folder / "notes.txt").write_text("not ours")
        (folder / "other.json").write_text('{"no": "expiry"}')
        return {"notes.txt", "other.json"}

    return Backend(
        open=lambda ttl: LocalFileStore(folder, ttl_seconds=ttl),
        entries=lambda: {p.name for p in folder.iterdir()} if folder.exists() else set(),
        entries_of=lambda file_id: {file_id, f"{file_id}.json"},
        write_without_metadata=lambda file_id: (folder / file_id).write_bytes(PNG),
        write_outside=write_outside,
        write_foreign=write_foreign,
    )


# ---- S3 on moto's server ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # The moto server accepts any credentials; these keep boto3 away from real ones.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bucket(s3_endpoint: str) -> Iterator[str]:
    s3 = boto3.resource("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    try:
        yield BUCKET
    finally:
        s3.Bucket(BUCKET).objects.all().delete()
        s3.Bucket(BUCKET).delete()


def _client(endpoint: str) -> BaseClient:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _store(endpoint: str, ttl: float, prefix: str = PREFIX) -> S3FileStore:
    return S3FileStore.from_url(f"s3://{BUCKET}/{prefix}", ttl, endpoint_url=endpoint)


def _keys(endpoint: str) -> set[str]:
    listing = _client(endpoint).list_objects_v2(Bucket=BUCKET)
    return {o["Key"] for o in listing.get("Contents", [])}


def s3_backend(endpoint: str) -> Backend:
    def write_outside(name: str) -> None:
        _client(endpoint).put_object(
            Bucket=BUCKET, Key=name, Body=b"outside the store",
            ContentType="image/png", Metadata={EXPIRES_AT_KEY: repr(FAR_FUTURE)},
        )  # fmt: skip

    def write_foreign() -> set[str]:
        _client(endpoint).put_object(Bucket=BUCKET, Key="elsewhere/keep-me", Body=b"not ours")
        return {"elsewhere/keep-me"}

    return Backend(
        open=lambda ttl: _store(endpoint, ttl),
        entries=lambda: _keys(endpoint),
        entries_of=lambda file_id: {f"{PREFIX}/{file_id}"},
        write_without_metadata=lambda file_id: _client(endpoint).put_object(
            Bucket=BUCKET, Key=f"{PREFIX}/{file_id}", Body=b"foreign"
        ),
        write_outside=write_outside,
        write_foreign=write_foreign,
    )


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return local_backend(tmp_path)
    # Only the S3 cases start moto.
    request.getfixturevalue("bucket")
    return s3_backend(request.getfixturevalue("s3_endpoint"))


# ---- the contract -------------------------------------------------------------------


def test_put_get_roundtrip_keeps_bytes_and_content_type(backend: Backend) -> None:
    store = backend.open(60)
    before = time.time()
    file_id = store.put(PNG, "image/png")

    stored = store.get(file_id)

    assert stored is not None
    assert stored.data == PNG
    assert stored.content_type == "image/png"
    assert before + 60 <= stored.expires_at <= time.time() + 60
    assert backend.entries() == backend.entries_of(file_id)


def test_content_type_of_each_format_is_kept(backend: Backend) -> None:
    store = backend.open(60)
    for content_type in ("image/png", "image/jpeg", "image/webp"):
        stored = store.get(store.put(b"data", content_type))
        assert stored is not None
        assert stored.content_type == content_type


def test_ids_are_43_url_safe_characters_and_never_repeat(backend: Backend) -> None:
    store = backend.open(60)
    ids = [store.put(PNG, "image/png") for _ in range(20)]

    assert len(set(ids)) == 20
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", i) for i in ids)
    assert all(is_valid_file_id(i) for i in ids)


def test_expired_file_is_none_and_deleted(backend: Backend) -> None:
    store = backend.open(-1)
    file_id = store.put(PNG, "image/webp")
    assert backend.entries() == backend.entries_of(file_id)

    assert store.get(file_id) is None
    assert backend.entries() == set()


def test_bogus_and_unknown_ids_are_none(backend: Backend) -> None:
    store = backend.open(60)
    store.put(PNG, "image/png")
    backend.write_outside("secret")

    assert store.get("../secret") is None
    assert store.get("../../etc/passwd") is None
    assert store.get("") is None
    assert store.get("x" * 44) is None
    assert store.get("x" * 42) is None
    assert store.get(new_file_id()) is None


def test_file_without_metadata_is_never_served(backend: Backend) -> None:
    # Local: data present, metadata not yet, the writer has not finished.
    # S3: an object with no expiry was not written by this store.
    store = backend.open(60)
    file_id = new_file_id()
    backend.write_without_metadata(file_id)

    assert store.get(file_id) is None


def test_purge_removes_only_expired(backend: Backend) -> None:
    # Two stores on one place stand for replicas writing with different TTLs.
    fresh = backend.open(3600)
    stale = backend.open(-1)
    kept = [fresh.put(PNG, "image/png") for _ in range(3)]
    for _ in range(2):
        stale.put(PNG, "image/png")
    foreign = backend.write_foreign()

    assert fresh.purge_expired() == 2

    assert backend.entries() == {e for i in kept for e in backend.entries_of(i)} | foreign
    assert all(fresh.get(i) is not None for i in kept)
    assert fresh.purge_expired() == 0


# ---- ids ------------------------------------------------------------------------------


def test_new_ids_are_valid_and_distinct() -> None:
    ids = {new_file_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(is_valid_file_id(i) for i in ids)


@pytest.mark.parametrize("bad", ["", "x" * 42, "x" * 44, "a/" + "x" * 41, "+" * 43, "=" * 43])
def test_invalid_ids_are_refused(bad: str) -> None:
    assert not is_valid_file_id(bad)


# ---- choosing the store ---------------------------------------------------------------


def test_settings_choose_the_store(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    s3_settings = Settings(
        files_url=f"s3://{BUCKET}/via-settings", s3_endpoint_url=s3_endpoint, url_ttl=60
    )
    store = open_file_store(s3_settings)
    assert isinstance(store, S3FileStore)
    assert store.get(store.put(PNG, "image/png")) is not None

    local = open_file_store(Settings(files_dir=tmp_path, url_ttl=60))
    assert isinstance(local, LocalFileStore)


def test_local_store_does_not_import_boto3(tmp_path: Path) -> None:
    # A fresh interpreter: this one has imported boto3 already.
    code = (
        "import sys\n"
        "from sdxl_service.api.files import open_file_store\n"
        "from sdxl_service.settings import Settings\n"
        f"open_file_store(Settings(files_dir={str(tmp_path)!r}, files_url=''))\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- S3 only: prefixes and urls ---------------------------------------------------------


def test_prefixes_do_not_see_each_other(s3_endpoint: str, bucket: str) -> None:
    first = _store(s3_endpoint, ttl=60, prefix="a")
    second = _store(s3_endpoint, ttl=-1, prefix="b")
    file_id = first.put(PNG, "image/png")
    second.put(PNG, "image/png")

    assert second.get(file_id) is None
    assert second.purge_expired() == 1
    assert first.get(file_id) is not None


def test_bucket_root_without_prefix(s3_endpoint: str, bucket: str) -> None:
    store = S3FileStore.from_url(f"s3://{BUCKET}", 60, endpoint_url=s3_endpoint)
    file_id = store.put(PNG, "image/png")

    assert _keys(s3_endpoint) == {file_id}
    assert store.get(file_id) is not None


@pytest.mark.parametrize("url", ["bucket/prefix", "s3://", "https://bucket/prefix", "s3:///x"])
def test_from_url_rejects_non_s3_urls(url: str) -> None:
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        S3FileStore.from_url(url, 60)
