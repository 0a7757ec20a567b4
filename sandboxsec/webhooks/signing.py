"""Standard Webhooks signatures (https://www.standardwebhooks.com), pure.

Each delivery carries ``webhook-id`` (the delivery id, the same on every retry, so a receiver
can drop duplicates), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body`` with the
secret).  Secrets are ``whsec_`` + base64 of 32 random bytes.  Signing is done by the
``standardwebhooks`` reference library.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime

from standardwebhooks.webhooks import Webhook

__all__ = ["new_secret", "signed_headers"]


def new_secret() -> str:
    """A fresh webhook secret in the ``whsec_`` format."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def signed_headers(secret: str, msg_id: str, timestamp: datetime, body: str) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt."""
    signature = Webhook(secret).sign(msg_id, timestamp, body)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": signature, "content-type": "application/json"}
