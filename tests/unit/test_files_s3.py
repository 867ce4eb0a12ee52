"""S3FileStore against a real S3 server: moto in server mode on a loopback port."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer

from sdxl_service.files import LocalFileStore, new_file_id, open_file_store
from sdxl_service.files_s3 import S3FileStore
from sdxl_service.settings import Settings

BUCKET = "sdxl-files"
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 100


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
    yield BUCKET
    s3.Bucket(BUCKET).objects.all().delete()
    s3.Bucket(BUCKET).delete()


def _store(endpoint: str, ttl: float, prefix: str = "images") -> S3FileStore:
    return S3FileStore.from_url(f"s3://{BUCKET}/{prefix}", ttl, endpoint_url=endpoint)


def _keys(endpoint: str) -> set[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


def test_put_get_roundtrip_keeps_bytes_and_content_type(s3_endpoint: str, bucket: str) -> None:
    store = _store(s3_endpoint, ttl=60)
    before = time.time()
    file_id = store.put(PNG, "image/png")

    stored = store.get(file_id)

    assert stored is not None
    assert stored.data == PNG
    assert stored.content_type == "image/png"
    assert before + 60 <= stored.expires_at <= time.time() + 60
    assert _keys(s3_endpoint) == {f"images/{file_id}"}


def test_content_type_of_each_format_is_kept(s3_endpoint: str, bucket: str) -> None:
    store = _store(s3_endpoint, ttl=60)
    for content_type in ("image/jpeg", "image/webp"):
        stored = store.get(store.put(b"data", content_type))
        assert stored is not None
        assert stored.content_type == content_type


def test_expired_file_is_none_and_deleted(s3_endpoint: str, bucket: str) -> None:
    store = _store(s3_endpoint, ttl=-1)
    file_id = store.put(PNG, "image/png")

    assert store.get(file_id) is None
    assert _keys(s3_endpoint) == set()


def test_bogus_and_unknown_ids_are_none(s3_endpoint: str, bucket: str) -> None:
    store = _store(s3_endpoint, ttl=60)
    store.put(PNG, "image/png")

    assert store.get("../../etc/passwd") is None
    assert store.get("") is None
    assert store.get("x" * 44) is None
    assert store.get(new_file_id()) is None


def test_object_without_expiry_metadata_is_never_served(s3_endpoint: str, bucket: str) -> None:
    file_id = new_file_id()
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=BUCKET, Key=f"images/{file_id}", Body=b"foreign")

    assert _store(s3_endpoint, ttl=60).get(file_id) is None


def test_purge_removes_only_expired(s3_endpoint: str, bucket: str) -> None:
    # Two stores on one prefix stand for replicas writing with different TTLs.
    fresh = _store(s3_endpoint, ttl=3600)
    stale = _store(s3_endpoint, ttl=-1)
    kept = [fresh.put(PNG, "image/png") for _ in range(3)]
    for _ in range(2):
        stale.put(PNG, "image/png")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=BUCKET, Key="elsewhere/keep-me", Body=b"not ours")

    assert fresh.purge_expired() == 2

    assert _keys(s3_endpoint) == {f"images/{i}" for i in kept} | {"elsewhere/keep-me"}
    assert all(fresh.get(i) is not None for i in kept)
    assert fresh.purge_expired() == 0


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


def test_settings_choose_the_store(s3_endpoint: str, bucket: str, tmp_path) -> None:
    s3_settings = Settings(
        files_url=f"s3://{BUCKET}/via-settings", s3_endpoint_url=s3_endpoint, url_ttl=60
    )
    store = open_file_store(s3_settings)
    assert isinstance(store, S3FileStore)
    assert store.get(store.put(PNG, "image/png")) is not None

    local = open_file_store(Settings(files_dir=tmp_path, url_ttl=60))
    assert isinstance(local, LocalFileStore)
