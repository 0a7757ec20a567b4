"""Reason codes of tenants and API keys."""

from __future__ import annotations

from sandboxsec.errors import AuthenticationError, ConflictError, InputError

__all__ = ["ApiKeyInvalidError", "TenantNameInvalidError", "TenantNameTakenError"]


class ApiKeyInvalidError(AuthenticationError):
    """The API key is missing, malformed, unknown or revoked."""

    code = "api_key_invalid"


class TenantNameTakenError(ConflictError):
    """A tenant with this name exists already."""

    code = "tenant_name_taken"


class TenantNameInvalidError(InputError):
    """Tenant names are 1-200 printable characters."""

    code = "tenant_name_invalid"


class TenantConfirmationError(InputError):
    """A destructive tenant operation was not confirmed with the tenant's name."""

    code = "tenant_confirmation_mismatch"
