"""Reason codes of per-tenant webhooks (docs/errors.md)."""

from __future__ import annotations

from sandboxsec.errors import DependencyUnavailableError, InputError

__all__ = ["WebhookKeyUnavailableError", "WebhookUrlInvalidError"]


class WebhookUrlInvalidError(InputError):
    """The webhook URL must be an https:// URL of a public host (no credentials, fragment)."""

    code = "webhook_url_invalid"


class WebhookKeyUnavailableError(DependencyUnavailableError):
    """The webhook secret cannot be wrapped or unwrapped by the root key now."""

    code = "webhook_key_unavailable"
