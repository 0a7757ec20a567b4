"""What the service last signed, kept outside the database: one MAC'd state file per log.

Before it signs a checkpoint the service checks that the new tree extends the tree in this file
(:func:`check_extends`); a database administrator who rewrites entries, leaf hashes, links and
the head cannot also rewrite this file, so the service refuses to sign an altered past.  Files
live under ``<home>/audit/state/`` (0600, directory 0700) and hold the checkpoint note, the tree
frontier and the last leaf hash, under an HMAC-SHA256 with a key derived from the audit secret.
An integrity alarm is a (durable) marker file under ``<home>/audit/alarms/``; it stops the log
in every process that shares the home until an operator clears it.

A state file only moves forward: :meth:`StateFiles.advance` keeps the larger tree when two
processes publish out of order.  Its limits (rollback of the file by someone with the service's
file system, first use) are stated in docs/audit.md; witnesses cover them.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sandboxsec.audit.entry import GENESIS_PREV, entry_prefix
from sandboxsec.audit.errors import AuditHistoryMismatchError, AuditStateInvalidError
from sandboxsec.audit.merkle import Frontier, ProofError, leaf_hash
from sandboxsec.clock import rfc3339
from sandboxsec.encoding import b64decode_strict
from sandboxsec.statefiles import private_dir, replace_private

__all__ = ["Alarm", "SignedState", "StateFiles", "check_extends"]

_FORMAT = "sandboxsec-audit-state/1"
_SAFE = re.compile(r"[A-Za-z0-9_.-]{1,80}")


def _file_name(log_id: str) -> str:
    # Log ids are tenant ids or "_service"; anything else is named by its hash.
    if _SAFE.fullmatch(log_id) and not log_id.startswith("."):
        return log_id + ".json"
    return "h-" + hashlib.sha256(log_id.encode()).hexdigest() + ".json"


@dataclass(frozen=True, slots=True)
class SignedState:
    """The last checkpoint the service signed for one log, and the tree it signed."""

    log_id: str
    size: int
    root_hash: bytes
    frontier: tuple[bytes, ...]
    last_leaf: bytes | None
    note: str

    def payload(self) -> dict[str, object]:
        return {
            "format": _FORMAT,
            "log_id": self.log_id,
            "size": self.size,
            "root": base64.b64encode(self.root_hash).decode(),
            "frontier": [base64.b64encode(h).decode() for h in self.frontier],
            "last_leaf": self.last_leaf.hex() if self.last_leaf is not None else None,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class Alarm:
    """Why a log was stopped."""

    log_id: str
    code: str
    message: str
    at: str


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


class StateFiles:
    """The per-log state files and alarm markers under one directory."""

    def __init__(self, directory: Path, mac_key: Callable[[], bytes]) -> None:
        # The key is read on first use: building the audit log must not touch the key files.
        self._dir = directory / "state"
        self._alarms = directory / "alarms"
        # Alarm marker paths by log id: every append checks its log's marker (a file another
        # worker may create at any moment), and building the path is most of that check.
        self._alarm_paths: dict[str, str] = {}
        self._key_source = mac_key
        self._mac_key: bytes | None = None

    @property
    def _key(self) -> bytes:
        if self._mac_key is None:
            self._mac_key = self._key_source()
        return self._mac_key

    # ---------------------------------------------------------------------------- state

    def load(self, log_id: str) -> SignedState | None:
        """The state of ``log_id`` (None before its first checkpoint).

        Raises :class:`AuditStateInvalidError` when the file is unreadable, malformed, for
        another log, or its MAC does not verify.
        """
        path = self._dir / _file_name(log_id)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditStateInvalidError("the audit state file cannot be read") from exc
        try:
            doc = json.loads(raw)
            mac = bytes.fromhex(doc.pop("mac"))
            expected = hmac.digest(self._key, _canonical(doc), "sha256")
            if not hmac.compare_digest(mac, expected):
                raise ValueError("MAC")
            if doc["format"] != _FORMAT or doc["log_id"] != log_id:
                raise ValueError("another log")
            frontier = tuple(b64decode_strict(h) for h in doc["frontier"])
            state = SignedState(
                log_id=log_id,
                size=int(doc["size"]),
                root_hash=b64decode_strict(doc["root"]),
                frontier=frontier,
                last_leaf=bytes.fromhex(doc["last_leaf"]) if doc["last_leaf"] else None,
                note=str(doc["note"]),
            )
            Frontier(state.size, list(frontier))  # validates the frontier's shape
        except (ValueError, KeyError, TypeError, AttributeError, ProofError) as exc:
            raise AuditStateInvalidError(
                f"the audit state file of log {log_id} fails its integrity check"
            ) from exc
        return state

    def advance(self, state: SignedState) -> bool:
        """Store ``state`` unless the file already holds a tree at least as large.

        Returns whether it was written.  Atomic (rename) and durable (fsync) before returning.
        """
        private_dir(self._dir)
        lock = os.open(self._dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.load(state.log_id)
            if current is not None and current.size >= state.size:
                return False
            payload = state.payload()
            payload["mac"] = hmac.digest(self._key, _canonical(payload), "sha256").hex()
            # Atomic (rename) but not fsynced: losing the newest state to a power cut leaves an
            # older genuine one, which every later tree still extends.  Safe, and it keeps an
            # fsync off every checkpoint.
            replace_private(self._dir / _file_name(state.log_id), _canonical(payload),
                           durable=False)
            return True
        finally:
            os.close(lock)

    # --------------------------------------------------------------------------- alarms

    def raise_alarm(self, log_id: str, code: str, message: str, at: datetime) -> Alarm:
        """Record an alarm for ``log_id`` (the first one is kept) and return it."""
        private_dir(self._alarms)
        alarm = Alarm(log_id, code, message, rfc3339(at))
        path = self._alarms / _file_name(log_id)
        if not path.exists():
            replace_private(path, _canonical(
                {"log_id": log_id, "code": code, "message": message, "at": alarm.at}
            ))
        return self.alarm(log_id) or alarm

    def alarm(self, log_id: str) -> Alarm | None:
        """The alarm of ``log_id``, if any (read from the file system on every call)."""
        path = self._alarm_paths.get(log_id)
        if path is None:
            if len(self._alarm_paths) >= 65536:  # bounded: one entry per log ever seen
                self._alarm_paths.clear()
            path = self._alarm_paths[log_id] = str(self._alarms / _file_name(log_id))
        return self._read_alarm(path)

    def alarms(self) -> list[Alarm]:
        """Every raised alarm (what ``/healthz`` reports)."""
        if not self._alarms.is_dir():
            return []
        found = (self._read_alarm(p) for p in sorted(self._alarms.glob("*.json")))
        return [a for a in found if a is not None]

    def clear_alarm(self, log_id: str) -> bool:
        """Remove the alarm of ``log_id`` (an operator's decision after investigating)."""
        path = self._alarms / _file_name(log_id)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def forget(self, log_id: str) -> None:
        """Drop the state of ``log_id`` so the next checkpoint is trusted on first use."""
        (self._dir / _file_name(log_id)).unlink(missing_ok=True)

    @staticmethod
    def _read_alarm(path: str | Path) -> Alarm | None:
        # A plain open() on a str path: every append checks its log's marker this way.
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read())
            return Alarm(str(doc["log_id"]), str(doc["code"]), str(doc["message"]),
                         str(doc["at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # An unreadable marker is still an alarm: fail closed.
            return Alarm(Path(path).stem, "audit_state_invalid", "unreadable alarm marker", "")


def check_extends(
    state: SignedState,
    stored: Sequence[tuple[int, bytes, bytes]],
    new_leaves: Sequence[bytes],
    new_prev: bytes | None,
    new_size: int,
    new_root: bytes,
) -> None:
    """Prove that the tree about to be signed extends the one last signed, or raise.

    ``stored`` are the database's ``(seq, line, leaf hash)`` of the entries since the last
    signed size, in order; ``new_leaves`` the leaf hashes this process is appending now and
    ``new_prev`` the predecessor hash the first of them records.  Pure.

    1. The log is not shorter than what was signed.
    2. The stored entries continue at the signed size with no gap, each line hashes to its leaf
       and records the hash of its predecessor (the first one the signed last leaf); so does
       the first entry being appended now.
    3. The signed frontier extended by those leaves gives exactly the new size and root.
    Raises :class:`AuditHistoryMismatchError` naming what does not hold.
    """
    # 1. Not shorter.
    if new_size < state.size:
        raise AuditHistoryMismatchError(
            f"log {state.log_id} has {new_size} entries, fewer than the {state.size} signed"
        )
    # 2. The stored continuation is well formed and linked.
    prefix = entry_prefix(state.log_id)
    prev = state.last_leaf.hex().encode() if state.last_leaf is not None else GENESIS_PREV.encode()
    leaves: list[bytes] = []
    for i, (seq, line, leaf) in enumerate(stored):
        expected = state.size + i
        head = prefix + str(expected).encode() + b',"prev":"' + prev + b'"'
        if seq != expected or not line.startswith(head) or leaf_hash(line) != leaf:
            raise AuditHistoryMismatchError(
                f"entry {expected} of log {state.log_id} does not continue the signed tree"
            )
        prev = leaf.hex().encode()
        leaves.append(leaf)
    if new_leaves and (new_prev.hex().encode() if new_prev else GENESIS_PREV.encode()) != prev:
        raise AuditHistoryMismatchError(
            f"the head of log {state.log_id} does not record the hash of its last entry"
        )
    # 3. Same tree.
    frontier = Frontier(state.size, list(state.frontier))
    frontier.extend(leaves)
    frontier.extend(list(new_leaves))
    if frontier.size != new_size or frontier.root() != new_root:
        raise AuditHistoryMismatchError(
            f"the stored log {state.log_id} does not extend the checkpoint of size "
            f"{state.size} this service signed: its past was altered"
        )
