"""Webhooks as the Standard Webhooks specification defines them (https://www.standardwebhooks.com).

signing.py signs (`webhook-id`, `webhook-timestamp`, `webhook-signature`),
hosts.py decides which addresses a webhook may reach (SDXL_WEBHOOK_HOSTS) and
resolves names before any connection, delivery.py sends with retries and
reports each attempt.
"""

from __future__ import annotations

from .delivery import WebhookDelivery, WebhookEvent
from .hosts import CheckedTarget, WebhookHosts, WebhookRefused
from .signing import WebhookSigner

__all__ = [
    "CheckedTarget",
    "WebhookDelivery",
    "WebhookEvent",
    "WebhookHosts",
    "WebhookRefused",
    "WebhookSigner",
]
