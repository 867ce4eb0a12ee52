"""Standard Webhooks signatures: `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).

The key is the base64 part of the `whsec_…` secret (SDXL_WEBHOOK_SECRET), as
the specification's reference libraries read it, so a receiver verifies with
any of them given the same secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

SECRET_PREFIX = "whsec_"


class WebhookSigner:
    def __init__(self, secret: str) -> None:
        # Padding added as the reference libraries add it: secrets are often given unpadded.
        self._key = base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==")

    def signature(self, message_id: str, timestamp: int, body: bytes) -> str:
        signed = f"{message_id}.{timestamp}.".encode() + body
        digest = hmac.new(self._key, signed, hashlib.sha256).digest()
        return "v1," + base64.b64encode(digest).decode()

    def headers(self, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        """The three headers of one delivery attempt (the timestamp is the attempt's own)."""
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.signature(message_id, timestamp, body),
        }
