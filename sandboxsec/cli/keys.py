"""``sandboxsec keys``: rotate, re-wrap, retire and inspect a tenant's encryption keys."""

from __future__ import annotations

import argparse
from typing import Any

from sandboxsec.cli._args import decimal
from sandboxsec.cli._common import open_services, print_json
from sandboxsec.crypto.admin import KeyStatus

__all__ = ["register"]


def register(subs: Any) -> None:
    """Add ``keys rotate``, ``keys rewrap``, ``keys retire``, ``keys status``, ``keys migrate``
    and ``keys service``."""
    p = subs.add_parser("keys", help="manage a tenant's encryption keys")
    ks = p.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    ks.required = True
    r = ks.add_parser("rotate", help="make a new key version; old data stays readable")
    r.add_argument("--tenant", required=True, help="tenant id or name")
    r.add_argument("--rewrap", action="store_true",
                   help="also re-wrap old data keys under the new version")
    r.set_defaults(handler=_rotate)
    w = ks.add_parser("rewrap", help="re-wrap old data keys under the current version")
    w.add_argument("--tenant", required=True, help="tenant id or name")
    w.set_defaults(handler=_rewrap)
    t = ks.add_parser("retire", help="set the minimum decryption version")
    t.add_argument("--tenant", required=True, help="tenant id or name")
    t.add_argument("--min-version", required=True, type=decimal)
    t.set_defaults(handler=_retire)
    s = ks.add_parser("status", help="show the tenant's key versions")
    s.add_argument("--tenant", required=True, help="tenant id or name")
    s.set_defaults(handler=_status)
    m = ks.add_parser("migrate", help="re-wrap KEKs still wrapped by the root key alone under "
                      "their tenant's own key (one-off step after upgrading)")
    m.add_argument("--tenant", help="tenant id or name (default: every tenant)")
    m.set_defaults(handler=_migrate)
    v = ks.add_parser("service", help="show the service's own keys, held once for every node "
                      "(creating them, or importing this node's key files, if none exist)")
    v.set_defaults(handler=_service)


def _status_json(status: KeyStatus) -> dict[str, Any]:
    return {
        "tenant_id": status.tenant_id,
        "current_version": status.current_version,
        "min_decryption_version": status.min_decryption_version,
        "shredded_at": status.shredded_at,
        "versions": [
            {"version": v.version, "created_at": v.created_at, "provider": v.provider_id,
             "data_keys": v.data_keys}
            for v in status.versions
        ],
    }


def _rotate(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        tenant = services.tenants.find(args.tenant)
        services.key_admin.rotate(tenant.id, None)
        result = services.key_admin.rewrap(tenant.id, None) if args.rewrap else None
        status = services.key_admin.status(tenant.id)
    finally:
        services.close()
    out = _status_json(status)
    if result is not None:
        out["rewrapped"] = result.rewrapped
        out["skipped_retired"] = result.skipped_retired
    print_json(out)
    return 0


def _rewrap(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        tenant = services.tenants.find(args.tenant)
        result = services.key_admin.rewrap(tenant.id, None)
    finally:
        services.close()
    print_json({"tenant_id": tenant.id, "version": result.version,
                "rewrapped": result.rewrapped, "skipped_retired": result.skipped_retired})
    return 0


def _retire(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        tenant = services.tenants.find(args.tenant)
        status = services.key_admin.retire(tenant.id, None, args.min_version)
    finally:
        services.close()
    print_json(_status_json(status))
    return 0


def _status(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        tenant = services.tenants.find(args.tenant)
        status = services.key_admin.status(tenant.id)
    finally:
        services.close()
    print_json(_status_json(status))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        # This node's service key files go into the cluster's store first (a no-op once
        # the cluster has its keys; a node whose files differ is refused).
        services.service_keys.establish()
        imported = [k.name for k in services.service_keys.status() if k.origin == "imported"]
        tenant_id = services.tenants.find(args.tenant).id if args.tenant else None
        moved = services.key_hierarchy.migrate_tenant_keys(tenant_id)
    finally:
        services.close()
    print_json({"tenant_id": tenant_id, "keks_moved": moved,
                "service_keys_imported": imported})
    return 0


def _service(_args: argparse.Namespace) -> int:
    services = open_services()
    try:
        status = services.service_keys.status()
    finally:
        services.close()
    print_json([{"name": k.name, "version": k.version, "kind": k.kind, "held": k.holder,
                 "origin": k.origin, "fingerprint": k.fingerprint} for k in status])
    return 0
