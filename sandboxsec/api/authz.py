"""Role-based authorization of API permissions, in one place (casbin over the role table).

The role table belongs to the API: ``sandboxsec/api/data/roles.csv`` (with its casbin model
``roles_model.conf``), read from the installed package with :mod:`importlib.resources`.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import casbin

from sandboxsec.errors import ForbiddenError
from sandboxsec.principal import Principal

__all__ = ["authorize", "permissions_of", "role_table"]


def _data(name: str) -> str:
    return resources.files("sandboxsec.api").joinpath("data", name).read_text("utf-8")


def role_table() -> list[tuple[str, str]]:
    """Every ``(role, permission)`` pair of the packaged role table, in file order."""
    pairs = []
    for line in _data("roles.csv").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if fields[0] == "p" and len(fields) == 3:
            pairs.append((fields[1], fields[2]))
    return pairs


@lru_cache(maxsize=1)
def _enforcer() -> casbin.Enforcer:
    enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=_data("roles_model.conf")))
    for role, perm in role_table():
        enforcer.add_policy(role, perm)
    return enforcer


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
