"""``sandboxsec apikey``: list and revoke a tenant's API keys (``tenant key`` issues one)."""

from __future__ import annotations

import argparse
from typing import Any

from sandboxsec.cli._common import OUTPUT_FORMATS, emit, open_services, print_json

__all__ = ["register"]


def register(subs: Any) -> None:
    """Add ``apikey list`` and ``apikey revoke``."""
    p = subs.add_parser("apikey", help="list and revoke a tenant's API keys")
    ks = p.add_subparsers(dest="apikey_command", metavar="SUBCOMMAND")
    ks.required = True
    ls = ks.add_parser("list", help="the tenant's keys (ids, roles, labels; never the keys)")
    ls.add_argument("--tenant", required=True, help="tenant id or name")
    ls.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table")
    ls.set_defaults(handler=_list)
    rv = ks.add_parser("revoke", help="revoke a key: every server refuses it at once")
    rv.add_argument("--tenant", required=True, help="tenant id or name")
    rv.add_argument("key_id")
    rv.set_defaults(handler=_revoke)


def _list(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        tenant = services.tenants.find(args.tenant)
        keys = services.tenants.list_keys(tenant.id)
    finally:
        services.close()
    emit([{"key_id": k.id, "role": k.role, "label": k.label, "created_at": k.created_at,
           "revoked_at": k.revoked_at} for k in keys],
         ("key_id", "role", "label", "created_at", "revoked_at"), args.output)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        tenant = services.tenants.find(args.tenant)
        services.tenants.revoke_key(tenant.id, args.key_id, actor=None)
    finally:
        services.close()
    print_json({"tenant_id": tenant.id, "key_id": args.key_id, "revoked": True})
    return 0
