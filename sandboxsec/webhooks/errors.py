"""Reason codes of per-tenant webhooks (docs/errors.md)."""

from __future__ import annotations

from sandboxsec.errors import DependencyUnavailableError, InputError, NotFoundError

__all__ = ["WebhookKeyUnavailableError", "WebhookNotFoundError", "WebhookUrlInvalidError"]


class WebhookUrlInvalidError(InputError):
    """The webhook URL must be an https:// URL of a public host (no credentials, fragment)."""

    code = "webhook_url_invalid"


class WebhookNotFoundError(NotFoundError):
    """No such webhook for this tenant."""

    code = "webhook_not_found"


class WebhookKeyUnavailableError(DependencyUnavailableError):
    """The webhook secret cannot be wrapped or unwrapped by the root key now."""

    code = "webhook_key_unavailable"
