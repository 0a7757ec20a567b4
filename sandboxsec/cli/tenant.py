"""``sandboxsec tenant``: create tenants (and their first keys), issue and revoke keys."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sandboxsec.cli._common import OUTPUT_FORMATS, emit, open_services, print_json
from sandboxsec.principal import Role

__all__ = ["register"]


def register(subs: Any) -> None:
    """Add ``tenant list``, ``tenant create``, ``tenant delete`` and ``tenant key``."""
    p = subs.add_parser("tenant", help="manage tenants")
    ts = p.add_subparsers(dest="tenant_command", metavar="SUBCOMMAND")
    ts.required = True
    ls = ts.add_parser("list", help="list the tenants")
    ls.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table")
    ls.set_defaults(handler=_list)
    c = ts.add_parser("create", help="create a tenant; prints one API key per role (once)")
    c.add_argument("name")
    c.set_defaults(handler=_create)
    d = ts.add_parser("delete", help="delete a tenant: crypto-shred its data, revoke its keys")
    d.add_argument("tenant", help="tenant id or name")
    d.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
    d.set_defaults(handler=_delete)
    k = ts.add_parser("key", help="issue another API key for a tenant")
    k.add_argument("tenant", help="tenant id or name")
    k.add_argument("--role", required=True, choices=[str(r) for r in Role])
    k.add_argument("--label", default="")
    k.set_defaults(handler=_key)


def _list(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        tenants = services.tenants.list()
    finally:
        services.close()
    emit([{"tenant_id": t.id, "name": t.name, "created_at": t.created_at} for t in tenants],
         ("tenant_id", "name", "created_at"), args.output)
    return 0


def _create(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        created = services.tenants.create(args.name)
    finally:
        services.close()
    print_json({
        "tenant_id": created.tenant_id,
        "name": created.name,
        "keys": {str(role): issued.key for role, issued in created.keys.items()},
        "key_ids": {str(role): issued.key_id for role, issued in created.keys.items()},
    })
    return 0


def _key(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        tenant = services.tenants.find(args.tenant)
        issued = services.tenants.create_key(tenant.id, Role(args.role), actor=None,
                                             label=args.label)
    finally:
        services.close()
    print_json({"tenant_id": tenant.id, "key_id": issued.key_id, "role": str(issued.role),
                "key": issued.key})
    return 0


def _delete(args: argparse.Namespace) -> int:
    if not args.yes:
        print("error: tenant_confirmation_mismatch: deleting a tenant destroys its data; "
              "add --yes", file=sys.stderr)
        return 2
    services = open_services()
    try:
        tenant = services.tenants.find(args.tenant)
        d = services.tenants.delete(tenant.id, actor=None)
    finally:
        services.close()
    print_json({"tenant_id": d.tenant_id, "deleted_at": d.deleted_at,
                "keys_revoked": d.keys_revoked, "keks_destroyed": d.keks_destroyed,
                "deks_destroyed": d.deks_destroyed})
    return 0
