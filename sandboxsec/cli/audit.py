"""``sandboxsec audit``: the auditor's offline checks, and the operator's export tools.

``verify`` and ``verify-proof`` need no service and no database: only the file and the audit
public key obtained out of band.  Exit codes: 0 valid, 1 does not verify, 2 unusable input.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from sandboxsec.audit.cosignature import WitnessKey, parse_witness_key
from sandboxsec.audit.errors import AuditVerificationError
from sandboxsec.audit.keys import load_public_key
from sandboxsec.audit.record import SERVICE_LOG
from sandboxsec.audit.verify import verify_entry_proof, verify_export
from sandboxsec.audit.witness_policy import WitnessPolicy, parse_witness_policy
from sandboxsec.cli._args import decimal
from sandboxsec.people.audit_verify import verify_decisions

__all__ = ["register"]


def print_json(value: Any) -> None:
    """Pretty JSON on stdout (local: ``cli._common`` would load the database stack)."""
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def register(subs: Any) -> None:
    """Add ``audit verify``, ``verify-proof``, ``export``, ``checkpoint`` and ``public-key``."""
    p = subs.add_parser("audit", help="verify and export the tamper-evident audit log")
    a = p.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    a.required = True

    v = a.add_parser("verify", help="verify an audit export offline (exit 0 valid, 1 tampered)")
    v.add_argument("export", type=Path, help="the JSON Lines export file")
    v.add_argument("--public-key", required=True, type=Path,
                   help="the audit public key: PEM or a signed-note verifier key")
    v.add_argument("--key-name", help="require signatures under this key name")
    v.add_argument("--log", dest="log_id", help="require the export to be of this log")
    v.add_argument("--previous", action="append", default=[], type=Path, metavar="CHECKPOINT",
                   help="a checkpoint note kept from an earlier audit (repeatable): a fork or "
                   "a rewrite since then fails verification")
    v.add_argument("--workers", type=decimal, default=None, metavar="N",
                   help="workers that hash the entries of a large export (threads with the "
                   "native hasher, else processes; default: one per available core; 1: one "
                   "pass); the verdict is the same")
    _witness_args(v)
    v.set_defaults(handler=_verify)

    vp = a.add_parser("verify-proof", help="verify one entry's inclusion proof offline")
    vp.add_argument("bundle", type=Path, help="JSON from GET /v1/audit/proof")
    vp.add_argument("--public-key", required=True, type=Path)
    vp.set_defaults(handler=_verify_proof)

    e = a.add_parser("export", help="export a log from the database (operator)")
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="tenant id or name")
    who.add_argument("--service", action="store_true", help="the service's own log")
    e.add_argument("--from", dest="start", type=decimal, default=0)
    e.add_argument("--to", dest="end", type=decimal, default=None)
    e.add_argument("--since", type=decimal, default=None)
    e.add_argument("-o", "--output", type=Path, required=True)
    e.set_defaults(handler=_export)

    c = a.add_parser("checkpoint", help="print the newest checkpoint note of a log")
    cwho = c.add_mutually_exclusive_group(required=True)
    cwho.add_argument("--tenant")
    cwho.add_argument("--service", action="store_true")
    c.set_defaults(handler=_checkpoint)

    r = a.add_parser("report", help="verify an export and write a self-contained HTML report")
    r.add_argument("export", type=Path, help="the JSON Lines export file")
    r.add_argument("--public-key", required=True, type=Path)
    r.add_argument("--key-name", help="require signatures under this key name")
    r.add_argument("--labels", type=Path, help="JSON object mapping key ids to labels "
                   "(people, services), shown beside the ids")
    _witness_args(r)
    r.add_argument("-o", "--output", type=Path, required=True, help="the HTML file to write")
    r.set_defaults(handler=_report)

    al = a.add_parser("alarm", help="list integrity alarms, or clear one after investigating")
    al.add_argument("--clear", action="store_true", help="clear the alarm of the given log")
    awho = al.add_mutually_exclusive_group()
    awho.add_argument("--tenant")
    awho.add_argument("--service", action="store_true")
    al.add_argument("--reset-state", action="store_true",
                    help="with --clear: also forget the last signed checkpoint, so the next one "
                    "is trusted on first use (only after restoring or accepting the history)")
    al.set_defaults(handler=_alarm)

    k = a.add_parser("public-key", help="print the audit public key (give it to auditors)")
    k.add_argument("--verifier-key", action="store_true",
                   help="print the signed-note verifier key instead of PEM")
    k.set_defaults(handler=_public_key)


def _witness_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--witness", action="append", default=[], metavar="KEY",
                   help="a witness verifier key name+id+base64 (or a file holding one); "
                   "repeatable")
    p.add_argument("--min-witnesses", type=int, default=None, metavar="K",
                   help="valid cosignatures the newest checkpoint needs (default: every "
                   "--witness given)")
    p.add_argument("--policy", type=Path, metavar="FILE",
                   help="a C2SP tlog-policy file (witness, group, quorum lines) the newest "
                   "checkpoint's cosignatures must satisfy")


def _policy(args: argparse.Namespace) -> tuple[bool, WitnessPolicy | None]:
    if args.policy is None:
        return True, None
    raw = _read(args.policy, "policy")
    if raw is None:
        return False, None
    try:
        return True, parse_witness_policy(raw.decode("utf-8", errors="strict"))
    except (UnicodeDecodeError, ValueError) as exc:
        print(f"error: {args.policy} is not a tlog-policy file: {exc}", file=sys.stderr)
        return False, None


def _witnesses(args: argparse.Namespace) -> tuple[list[WitnessKey], int] | None:
    keys: list[WitnessKey] = []
    for text in args.witness:
        path = Path(text)
        try:
            raw = path.read_text() if "+" not in text and path.exists() else text
            keys.append(parse_witness_key(raw))
        except (OSError, ValueError) as exc:
            print(f"error: --witness {text!r} is not a witness key: {exc}", file=sys.stderr)
            return None
    default = 0 if args.policy is not None else len(keys)
    k = default if args.min_witnesses is None else args.min_witnesses
    if k < 0 or (k and not keys):
        print("error: --min-witnesses needs as many --witness keys", file=sys.stderr)
        return None
    return keys, k


def _read(path: Path, what: str) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        print(f"error: cannot read {what} {path}: {exc.strerror}", file=sys.stderr)
        return None


def _fail(exc: AuditVerificationError) -> int:
    where = f" (first bad entry: seq {exc.seq})" if exc.seq is not None else ""
    print(f"INVALID: {exc.reason}: {exc.message}{where}", file=sys.stderr)
    print_json({"valid": False, "code": exc.reason, "message": exc.message, "seq": exc.seq})
    return 1


def _key(path: Path) -> Any:
    raw = _read(path, "public key")
    if raw is None:
        return None
    try:
        return load_public_key(raw)
    except ValueError as exc:
        print(f"error: {path} is not an Ed25519 public key: {exc}", file=sys.stderr)
        return None


def _verify(args: argparse.Namespace) -> int:
    key = _key(args.public_key)
    data = _read(args.export, "export")
    previous = [_read(p, "checkpoint") for p in args.previous]
    policy = _witnesses(args)
    policy_ok, tlog_policy = _policy(args)
    if key is None or data is None or any(p is None for p in previous) or policy is None:
        return 2
    if not policy_ok:
        return 2
    try:
        notes = [p.decode("utf-8") for p in previous if p is not None]
        report = verify_export(
            data, key, key_name=args.key_name, expected_log=args.log_id,
            previous_checkpoints=notes, witnesses=policy[0], min_witnesses=policy[1],
            now=int(time.time()), policy=tlog_policy, workers=args.workers,
        )
        # Then every passkey-signed decision against its logged registration.
        decisions = verify_decisions(data, first_seq=report.first_seq)
    except UnicodeDecodeError:
        print("error: a checkpoint file is not UTF-8 text", file=sys.stderr)
        return 2
    except AuditVerificationError as exc:
        return _fail(exc)
    print_json({
        "valid": True,
        "log_id": report.log_id,
        "origin": report.origin,
        "entries": report.entries,
        "from": report.first_seq,
        "to": report.end_seq,
        "checkpoints": report.checkpoints,
        "consistency_proofs": report.consistency_proofs,
        "tree_size": report.tree_size,
        "root_hash": base64.b64encode(report.root_hash).decode(),
        "witnesses": [{"name": c.witness, "timestamp": c.timestamp}
                      for c in report.cosignatures],
        "passkeys_registered": decisions.registrations,
        "decisions_verified": decisions.decisions_verified,
        "decisions_unanchored": decisions.unanchored,
    })
    return 0


def _verify_proof(args: argparse.Namespace) -> int:
    key = _key(args.public_key)
    raw = _read(args.bundle, "proof bundle")
    if key is None or raw is None:
        return 2
    try:
        bundle = json.loads(raw)
    except ValueError:
        print("error: the proof bundle is not JSON", file=sys.stderr)
        return 2
    if not isinstance(bundle, dict):
        print("error: the proof bundle is not a JSON object", file=sys.stderr)
        return 2
    try:
        report = verify_entry_proof(bundle, key)
    except AuditVerificationError as exc:
        return _fail(exc)
    print_json({"valid": True, "log_id": report.log_id, "seq": report.seq,
                "tree_size": report.tree_size})
    return 0


def _open_services() -> Any:
    # Imported here: the offline checks above must not load the database stack.
    from sandboxsec.cli._common import open_services

    return open_services()


def _log_id(services: Any, args: argparse.Namespace) -> str:
    if args.service:
        return SERVICE_LOG
    # A deleted tenant's log stays exportable: the audit trail outlives the tenant.
    tenant_id: str = services.tenants.find(args.tenant, include_deleted=True).id
    return tenant_id


def _export(args: argparse.Namespace) -> int:
    services = _open_services()
    try:
        log_id = _log_id(services, args)
        lines = services.audit.export(log_id, start=args.start, end=args.end, since=args.since)
        tmp = args.output.with_name(args.output.name + ".part")
        with tmp.open("wb") as f:
            for line in lines:
                f.write(line)
        tmp.replace(args.output)
    finally:
        services.close()
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _checkpoint(args: argparse.Namespace) -> int:
    services = _open_services()
    try:
        cp = services.audit.checkpoint_now(_log_id(services, args))
    finally:
        services.close()
    sys.stdout.write(cp.note)
    return 0


def _public_key(args: argparse.Namespace) -> int:
    services = _open_services()
    try:
        keys = services.audit.keys
        sys.stdout.write(keys.verifier_key() + "\n" if args.verifier_key else keys.public_pem())
    finally:
        services.close()
    return 0


def _report(args: argparse.Namespace) -> int:
    from sandboxsec.audit.report import build_report

    key = _key(args.public_key)
    data = _read(args.export, "export")
    policy = _witnesses(args)
    policy_ok, tlog_policy = _policy(args)
    labels: dict[str, str] = {}
    if args.labels is not None:
        raw = _read(args.labels, "labels")
        try:
            parsed = json.loads(raw) if raw is not None else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            print("error: --labels is not a JSON object of key id to label", file=sys.stderr)
            return 2
        labels = {str(k): str(v) for k, v in parsed.items()}
    if key is None or data is None or policy is None or not policy_ok:
        return 2
    report = build_report(
        data, key, key_name=args.key_name, witnesses=policy[0], min_witnesses=policy[1],
        labels=labels, now=int(time.time()), policy=tlog_policy,
    )
    tmp = args.output.with_name(args.output.name + ".part")
    tmp.write_text(report.html, encoding="utf-8")
    tmp.replace(args.output)
    print_json({"valid": report.valid, "code": report.code, "output": str(args.output)})
    return 0 if report.valid else 1


def _alarm(args: argparse.Namespace) -> int:
    services = _open_services()
    try:
        states = services.audit.guard.states
        if not args.clear:
            print_json([{"log_id": a.log_id, "code": a.code, "message": a.message, "at": a.at}
                        for a in states.alarms()])
            return 0
        if not (args.tenant or args.service):
            print("error: --clear needs --tenant or --service", file=sys.stderr)
            return 2
        log_id = _log_id(services, args)
        cleared = states.clear_alarm(log_id)
        if args.reset_state:
            states.forget(log_id)
        # The operator's decision is itself evidence (in the service's log).
        from sandboxsec.audit.events import AuditEvent
        from sandboxsec.audit.record import AuditRecord

        services.audit.append(AuditRecord.by(
            None, AuditEvent.AUDIT_ALARM_CLEAR, "success",
            object_ids={"log_id": log_id}, body={"reset_state": args.reset_state},
        ))
        print_json({"log_id": log_id, "cleared": cleared, "state_reset": args.reset_state})
    finally:
        services.close()
    return 0
