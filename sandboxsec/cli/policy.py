"""``sandboxsec policy``: read and replace a tenant's action policy (docs/policy.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sandboxsec.cli._common import open_services, print_json
from sandboxsec.errors import InputError
from sandboxsec.policy.service import PolicyView
from sandboxsec.principal import Principal, Role

__all__ = ["OPERATOR_KEY_ID", "register"]

#: The key id recorded for changes made at the command line (an operator has no API key).
OPERATOR_KEY_ID = "operator"


def register(subs: Any) -> None:
    """Add ``policy get`` and ``policy put``."""
    p = subs.add_parser("policy", help="read and replace a tenant's action policy")
    ps = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    ps.required = True
    g = ps.add_parser("get", help="the policy in force")
    g.add_argument("--tenant", required=True, help="tenant id or name")
    g.add_argument("-o", "--output", choices=("text", "json"), default="text",
                   help="text: the policy file itself; json: with its version and hash")
    g.set_defaults(handler=_get)
    u = ps.add_parser("put", help="validate and install a policy file (- reads stdin)")
    u.add_argument("--tenant", required=True, help="tenant id or name")
    u.add_argument("file", help="policy file, or - for stdin")
    u.add_argument("--base-version", type=int, default=None,
                   help="refuse if the policy in force is no longer this version")
    u.set_defaults(handler=_put)


def _operator(tenant_id: str) -> Principal:
    return Principal(tenant_id=tenant_id, key_id=OPERATOR_KEY_ID, role=Role.ADMIN)


def _view_json(view: PolicyView) -> dict[str, Any]:
    return {"tenant_id": view.tenant_id, "version": view.version, "sha256": view.sha256,
            "rule_count": view.rule_count, "is_default": view.is_default,
            "updated_at": view.updated_at, "updated_by": view.updated_by, "text": view.text}


def _get(args: argparse.Namespace) -> int:
    services = open_services()
    try:
        tenant = services.tenants.find(args.tenant)
        view = services.policy.get_policy(_operator(tenant.id))
    finally:
        services.close()
    if args.output == "json":
        print_json(_view_json(view))
    else:
        sys.stdout.write(view.text if view.text.endswith("\n") else view.text + "\n")
    return 0


def _read(name: str) -> str:
    try:
        raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror}") from None
    try:
        # Bytes as they are: no newline translation (a CR is refused by the validator).
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{name} is not UTF-8") from None


def _put(args: argparse.Namespace) -> int:
    text = _read(args.file)
    services = open_services()
    try:
        tenant = services.tenants.find(args.tenant)
        view = services.policy.replace_policy(_operator(tenant.id), text,
                                              base_version=args.base_version)
    finally:
        services.close()
    out = _view_json(view)
    del out["text"]
    print_json(out)
    return 0
