"""Role-based authorization of API permissions, in one place (casbin over policies/roles.csv)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import casbin

from sandboxsec.errors import ForbiddenError
from sandboxsec.principal import Principal

__all__ = ["authorize", "permissions_of", "roles_files"]


def roles_files() -> tuple[Path, Path]:
    """The model and the role table: the packaged copy, which mirrors ``policies/``."""
    data = Path(__file__).resolve().parent.parent / "policy" / "data"
    return data / "roles_model.conf", data / "roles.csv"


@lru_cache(maxsize=1)
def _enforcer() -> casbin.Enforcer:
    model, table = roles_files()
    return casbin.Enforcer(str(model), str(table))


@lru_cache(maxsize=1024)
def _allowed(role: str, perm: str) -> bool:
    return bool(_enforcer().enforce(role, perm))


def authorize(principal: Principal, permission: str) -> None:
    """Raise :class:`ForbiddenError` unless the principal's role holds ``permission``."""
    if not _allowed(str(principal.role), permission):
        raise ForbiddenError(f"role {principal.role} may not {permission}")


def permissions_of(role: str) -> list[str]:
    """Every permission a role holds."""
    return sorted(p[1] for p in _enforcer().get_policy() if p[0] == role)
