"""Webhooks: signatures the reference library accepts, the host policy, delivery with retries,
against a real receiver on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from sdxl_service.api.jobs.webhooks import (
    WebhookDelivery,
    WebhookEvent,
    WebhookHosts,
    WebhookRefused,
    WebhookSigner,
)
from tests.polling import asyncio_test
from tests.webhook_receiver import running_receiver

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_a_signature_verifies_with_the_reference_library() -> None:
    body = b'{"type":"image.job.succeeded","data":{"id":"imgjob_x"}}'
    import time

    now = int(time.time())
    headers = WebhookSigner(SECRET).headers("msg_1", now, body)
    assert headers["webhook-signature"].startswith("v1,")
    payload = Webhook(SECRET).verify(body, headers)
    assert payload["data"]["id"] == "imgjob_x"
    # Any change of id, time or body breaks it.
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(body + b" ", headers)


def test_the_signature_is_the_reference_librarys_own() -> None:
    from datetime import UTC, datetime

    moment = datetime(2026, 12, 4, 20, 0, tzinfo=UTC)
    ours = WebhookSigner(SECRET).signature("msg_2", int(moment.timestamp()), b"{}")
    assert ours == Webhook(SECRET).sign("msg_2", moment, b"{}")


class FixedResolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError("name not known")
        return self.answers[host]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/x",
        "http://10.0.0.7/hook",
        "http://192.168.1.20/hook",
        "http://172.16.5.4/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x",
        "http://[::ffff:10.0.0.1]/x",
        "http://[fd00::1]/x",
        "http://0.0.0.0/x",
        "http://localhost/x",
        "http://rebind.test/x",
    ],
)
@asyncio_test(10)
async def test_by_default_only_public_addresses_are_reached(url: str) -> None:
    hosts = WebhookHosts(
        [],
        FixedResolver({"localhost": ["127.0.0.1"], "rebind.test": ["93.184.215.14", "10.0.0.5"]}),
    )
    with pytest.raises(WebhookRefused, match="may not reach"):
        await hosts.check(url)


@asyncio_test(10)
async def test_a_public_name_is_allowed_and_its_checked_address_kept() -> None:
    hosts = WebhookHosts([], FixedResolver({"hooks.example.com": ["93.184.215.14"]}))
    target = await hosts.check("https://hooks.example.com/a/b?c=d")
    assert target.address == ipaddress.ip_address("93.184.215.14")
    assert target.connect_url == "https://93.184.215.14:443/a/b?c=d"
    assert target.host_header == "hooks.example.com"


@asyncio_test(10)
async def test_listed_hosts_and_networks_are_allowed_and_nothing_else_unless_public() -> None:
    resolver = FixedResolver({"hooks.internal": ["10.9.9.9"], "example.com": ["93.184.215.14"]})
    hosts = WebhookHosts(["127.0.0.1", "192.168.0.0/16", "hooks.internal"], resolver)
    for url in ("http://127.0.0.1:9000/", "http://192.168.4.4/", "http://hooks.internal/"):
        await hosts.check(url)
    for url in ("http://10.0.0.1/", "http://example.com/"):
        with pytest.raises(WebhookRefused):
            await hosts.check(url)
    public_too = WebhookHosts(["public", "127.0.0.1"], resolver)
    await public_too.check("http://example.com/")
    with pytest.raises(WebhookRefused):
        await public_too.check("http://10.0.0.1/")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "example.com/hook",
        "http:///nohost",
        "http://user:pw@example.com/",
        "http://nowhere.invalid/",
    ],
)
@asyncio_test(10)
async def test_what_is_no_http_url_is_refused(url: str) -> None:
    with pytest.raises(WebhookRefused):
        await WebhookHosts([], FixedResolver({})).check(url)


class CountingTransport(httpx.AsyncBaseTransport):
    """The real transport, counting the requests that reach it (none may, when refused)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)


def delivery(
    hosts: WebhookHosts, transport: httpx.AsyncBaseTransport | None = None, attempts: int = 4
) -> WebhookDelivery:
    return WebhookDelivery(
        WebhookSigner(SECRET),
        hosts,
        attempts=attempts,
        timeout_s=5,
        retry_s=0.01,
        transport=transport,
    )


EVENT = WebhookEvent(
    message_id="msg_abc", event_type="image.job.succeeded", data={"id": "imgjob_abc"}
)


async def recorded(into: list[list[dict[str, Any]]]) -> Any:
    async def record(attempts: list[dict[str, Any]]) -> None:
        into.append(list(attempts))

    return record


@asyncio_test(30)
async def test_a_receiver_that_fails_twice_gets_it_the_third_time() -> None:
    with running_receiver(SECRET, answers=[500, 503]) as receiver:
        calls: list[list[dict[str, Any]]] = []
        delivered = await delivery(WebhookHosts(["127.0.0.1"])).deliver(
            receiver.url, EVENT, await recorded(calls), []
        )
    assert delivered
    assert [d.answered for d in receiver.deliveries] == [500, 503, 204]
    assert all(d.verified for d in receiver.deliveries)
    # The same message id every time (the receiver's idempotency key), its own timestamp each.
    assert {d.headers["webhook-id"] for d in receiver.deliveries} == {"msg_abc"}
    attempts = calls[-1]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status_code"] for a in attempts] == [500, 503, 204]
    assert attempts[-1]["error"] is None and attempts[0]["error"]
    body = json.loads(receiver.deliveries[-1].body)
    assert body["type"] == "image.job.succeeded" and body["data"] == {"id": "imgjob_abc"}
    assert body["timestamp"].endswith("Z")


@asyncio_test(30)
async def test_a_receiver_that_never_accepts_is_given_up_after_the_attempts() -> None:
    with running_receiver(SECRET, answers=[500] * 10) as receiver:
        calls: list[list[dict[str, Any]]] = []
        delivered = await delivery(WebhookHosts(["127.0.0.1"]), attempts=3).deliver(
            receiver.url, EVENT, await recorded(calls), []
        )
    assert not delivered
    assert len(receiver.deliveries) == 3 and len(calls[-1]) == 3


@asyncio_test(30)
async def test_the_delivery_connects_to_the_address_it_checked_not_the_name_again() -> None:
    # "receiver.test" resolves (here) to the receiver's loopback address, which is listed;
    # the system resolver knows no such name, so only the checked address can be reached.
    with running_receiver(SECRET) as receiver:
        hosts = WebhookHosts(["127.0.0.1"], FixedResolver({"receiver.test": ["127.0.0.1"]}))
        url = f"http://receiver.test:{receiver.port}/hook"
        calls: list[list[dict[str, Any]]] = []
        assert await delivery(hosts).deliver(url, EVENT, await recorded(calls), [])
    assert receiver.deliveries[0].headers["host"] == f"receiver.test:{receiver.port}"
    assert receiver.deliveries[0].verified


@pytest.mark.parametrize("url", ["http://10.20.30.40:8080/hook", "http://192.168.77.1/hook"])
@asyncio_test(30)
async def test_a_private_address_is_refused_and_no_packet_leaves(url: str) -> None:
    transport = CountingTransport()
    calls: list[list[dict[str, Any]]] = []
    delivered = await delivery(WebhookHosts([]), transport).deliver(
        url, EVENT, await recorded(calls), []
    )
    assert not delivered
    assert transport.requests == []
    assert len(calls[-1]) == 1 and calls[-1][0]["error"].startswith("refused:")
